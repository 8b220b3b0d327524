"""adapter_layout_on_load: ``PeftModel.from_pretrained`` of a transformers 4.x adapter (per-expert LoRA modules,
``experts.{e}.gate_proj`` ...) into a 5.x model, whose experts are fused ``gate_up_proj`` / ``down_proj`` tensors.

peft loads such a folder without a word and computes something else: measured on transformers 5.24 / peft 0.21.2
and 5.6.2 / 0.19.1 (peft's own v4 -> v5 conversion), a 4.57 adapter of qwen3_moe, mixtral, deepseek_v3 or glm4_moe
reloads with KL 0.7 to 1.6 against the model that trained it; peft 0.18 has no conversion and loads no expert LoRA.

With the patch such a folder is converted first (:func:`shims.convert_adapter` ``to="fused"`` in the layout the
installed peft gives these experts; exact: every expert delta unchanged) into a temporary folder, and peft loads
that. Other folders, hub ids and bases without fused experts go to peft unchanged; a fused adapter in the other
peft layout is left to peft (it reads the layout from the adapter's ``peft_version``) or to an explicit
``shims.convert_adapter``. :func:`conversion_for` says what a folder needs on a base.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path

from ..registry import Patch, Target, swap_attr

log = logging.getLogger("shims")

_WEIGHTS = "adapter_model.safetensors"


def is_per_expert_adapter(adapter_dir) -> bool:
    """Whether a saved adapter holds transformers 4.x per-expert expert LoRAs (``.experts.<e>.`` keys)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / _WEIGHTS), "pt") as fh:
        return any(".experts.0." in k for k in fh.keys())


def conversion_for(adapter_dir, base) -> str | None:
    """``"fused:<layout>"`` when the adapter folder holds 4.x per-expert expert LoRAs and ``base`` (a loaded model)
    has fused experts: what :func:`shims.convert_adapter` must produce for the installed peft; else None."""
    from .lora_layout import expected_layout
    from ..quant.storage import iter_expert_modules

    if not is_per_expert_adapter(adapter_dir) or not any(True for _ in iter_expert_modules(base)):
        return None
    # decided on this base's experts modules: peft's convention follows their is_transposed attribute
    return f"fused:{expected_layout(base)}"


def convert_for(adapter_dir, dst_dir, target: str, base_config) -> None:
    """Write the adapter folder converted to ``target`` (a :func:`conversion_for` answer) into ``dst_dir``."""
    from .adapter_convert import FUSED, convert_adapter

    convert_adapter(adapter_dir, dst_dir, to=FUSED, layout=target.removeprefix(f"{FUSED}:"), base_config=base_config,
                    overwrite=True)


def _local_adapter(model_id, subfolder) -> Path | None:
    folder = Path(str(model_id)) / (subfolder or "")
    return folder if (folder / _WEIGHTS).is_file() else None


def _install():
    import torch
    from peft import PeftModel

    original = PeftModel.__dict__["from_pretrained"].__func__

    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        folder = _local_adapter(model_id, kwargs.get("subfolder"))
        target = conversion_for(folder, model) if folder is not None and isinstance(model, torch.nn.Module) else None
        if target is None:
            return original(cls, model, model_id, *args, **kwargs)
        with tempfile.TemporaryDirectory(prefix="moe-shims-adapter-") as tmp:
            converted = Path(tmp) / "adapter"
            convert_for(folder, converted, target, model.config)
            log.info("shims: adapter %s converted to %s for this model before loading", folder, target)
            kwargs.pop("subfolder", None)
            return original(cls, model, str(converted), *args, **kwargs)

    from_pretrained.__shims_patched__ = True
    return swap_attr(PeftModel, "from_pretrained", classmethod(from_pretrained))


def _needed() -> str | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper  # noqa: F401
    except ImportError:
        return "this peft has no LoRA on fused expert tensors (target_parameters): no layout to convert to"
    return None


PATCHES: tuple = (
    Patch(
        name="adapter_layout_on_load",
        summary="PeftModel.from_pretrained of a transformers 4.x per-expert adapter into fused 5.x experts converts "
                "it exactly first (natively peft loads it and computes something else: KL 0.7-1.6 on 5.x)",
        targets=(Target("peft", "PeftModel.from_pretrained", ("model", "model_id")),),
        needed=_needed,
        install=_install,
    ),
)
