"""Does a saved adapter's expert LoRA have the layout a serving engine (or transformers) reads? If not, which
conversion fixes it.

The engine rules are facts read from the engines' sources (vLLM 0.33.0 lora/model_manager.py, SGLang 0.5.23, read from
source, the engine itself is not run here); re-check them when an engine version moves:

- vLLM reads fused 3D expert LoRA (``experts.base_layer`` = gate_up, ``experts`` = down; lora_B packed expert-fastest,
  i.e. peft >= 0.19's "standard" layout) only for the archs in :data:`VLLM_FUSED_EXPERT_MODEL_TYPES`; every other
  arch needs per-expert LoRA modules. A peft 0.18 "swapped" adapter fails to load there with a shape error.
- SGLang has no fused-expert LoRA: per-expert modules only (so nothing for gpt_oss, whose experts are always fused).
- transformers: fused ``target_parameters`` LoRA on 5.x, in the layout of the installed peft; per-expert modules on
  4.57 (gpt_oss: fused there too, see :mod:`shims.adapter_per_expert`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapter_convert import PER_EXPERT, PER_EXPERT_KEY, read_tensors, detect_adapter_layout
from .adapter_per_expert import FUSED_ON_V4
from .base_config import load_base_config
from .files import read_json
from .lora_layout import STANDARD, ExpertDims, layout_from_peft_version

ENGINES = ("vllm", "sglang", "transformers")
SOURCES = ("vLLM 0.33.0 lora/model_manager.py, SGLang 0.5.23, read from source, the engine itself is not run here")
# vLLM 0.33.0 reads fused 3D expert LoRA for these model types only
VLLM_FUSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe"})
NO_EXPERT_LORA = "none"  # the adapter has no expert LoRA (attention only): every engine reads it
MIXED = "mixed"  # per-expert modules and fused expert LoRA in one adapter
MIXED_LAYOUTS = "mixed_layouts"  # fused expert LoRAs, some standard and some swapped


@dataclass(frozen=True)
class AdapterCheck:
    """The verdict of :func:`check_adapter`. ``found`` / ``needed``: "per_expert", "standard", "swapped" (fused
    layouts), "none" (no expert LoRA), "mixed" / "mixed_layouts" (found only); ``needed`` is None when the engine
    cannot read expert LoRA for this arch at all. ``conversion``: the command that fixes it, or None."""

    engine: str
    model_type: str | None
    found: str
    needed: str | None
    compatible: bool
    conversion: str | None
    reason: str
    source: str = SOURCES

    @property
    def exit_code(self) -> int:
        return 0 if self.compatible else 1

    def as_dict(self) -> dict:
        return asdict(self)


def check_adapter(adapter_dir, engine: str, base_config=None, transformers_version: str | None = None,
                  peft_version: str | None = None) -> AdapterCheck:
    """Whether ``engine`` (vllm / sglang / transformers) reads this adapter's expert LoRA as it is laid out.

    ``base_config``: as for :func:`shims.convert_adapter` (default: the adapter's ``base_model_name_or_path``, a local
    folder or a hub id in the local cache); needed whenever the adapter has expert LoRA. For ``engine="transformers"``
    the versions default to the installed transformers and peft. Rules and where they come from: this module's
    docstring (vLLM 0.33.0 lora/model_manager.py, SGLang 0.5.23, read from source, the engine itself is not run here).
    Raises ValueError / FileNotFoundError for bad input.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    adapter_dir = Path(adapter_dir)
    adapter_config = read_json(_config_path(adapter_dir))
    per_expert = any(PER_EXPERT_KEY.match(k) for k in read_tensors(adapter_dir))
    fused = bool(adapter_config.get("target_parameters"))
    if not (per_expert or fused):
        return AdapterCheck(engine, None, NO_EXPERT_LORA, NO_EXPERT_LORA, True, None,
                            "no expert LoRA in this adapter (attention / dense modules only): nothing to convert")
    base = load_base_config(base_config, adapter_config, required=True)
    model_type = _model_type(base)
    found = PER_EXPERT if per_expert and not fused else _fused_layout(adapter_dir, base, per_expert)
    needed, why = _needed(engine, model_type, base, transformers_version, peft_version)
    if needed == found:
        return AdapterCheck(engine, model_type, found, needed, True, None, f"{why}; the adapter has it")
    return AdapterCheck(engine, model_type, found, needed, False, _conversion(adapter_dir, found, needed),
                        f"{why}; the adapter has {_describe(found)}{_known_failure(engine, found)}")


def _config_path(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a saved peft adapter")
    return path


def _model_type(base: dict) -> str | None:
    text = base.get("text_config")
    model_type = base.get("model_type")
    # a multimodal wrapper names the MoE in its own model_type (qwen3_vl_moe); only a bare text config is read inside
    return model_type or (text.get("model_type") if isinstance(text, dict) else None)


def _fused_layout(adapter_dir: Path, base: dict, also_per_expert: bool) -> str:
    if also_per_expert:
        return MIXED
    layouts = {info.layout for info in detect_adapter_layout(adapter_dir, base).values()}
    return layouts.pop() if len(layouts) == 1 else MIXED_LAYOUTS


def _needed(engine: str, model_type: str | None, base: dict, transformers_version, peft_version):
    """(what ``engine`` reads for ``model_type``, why) -- "per_expert", a fused layout, or None (nothing)."""
    if engine == "vllm":
        if model_type in VLLM_FUSED_EXPERT_MODEL_TYPES:
            return STANDARD, f"vLLM reads {model_type} expert LoRA fused, in peft >= 0.19's standard layout"
        return PER_EXPERT, f"vLLM reads {model_type} expert LoRA as per-expert modules only"
    if engine == "sglang":
        if model_type in FUSED_ON_V4:
            return None, f"SGLang has no fused-expert LoRA and {model_type} has no per-expert modules"
        return PER_EXPERT, "SGLang reads expert LoRA as per-expert modules only (no fused-expert LoRA)"
    return _transformers_needs(model_type, base, transformers_version, peft_version)


def _transformers_needs(model_type, base, transformers_version, peft_version):
    transformers_version = transformers_version or _installed("transformers")
    peft_version = peft_version or _installed("peft")
    on = f"transformers {transformers_version} + peft {peft_version}"
    major = int(re.match(r"\d+", transformers_version).group())
    if major < 5 and model_type not in FUSED_ON_V4:
        return PER_EXPERT, f"{on} has per-expert expert modules"
    is_transposed = ExpertDims.from_config(base).is_transposed
    # 5.x experts modules declare is_transposed (gpt_oss); 4.57's gpt_oss does not, and peft reads the declaration
    layout = layout_from_peft_version(peft_version, is_transposed, declares_transposed=is_transposed and major >= 5)
    if layout is None:
        raise ValueError(f"peft {peft_version!r}: no known expert LoRA convention for this version")
    return layout, f"{on} reads {model_type} expert LoRA fused, in the {layout} layout"


def _installed(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError as exc:
        raise ValueError(f"{distribution} is not installed: pass its version to check against") from exc


def _conversion(adapter_dir: Path, found: str, needed: str | None) -> str | None:
    if needed is None or needed == NO_EXPERT_LORA:
        return None
    out = f"{adapter_dir}-{needed}"
    if found == PER_EXPERT:
        return f"python -m shims convert-adapter {adapter_dir} {out} --to fused --layout {needed}"
    if found == MIXED:
        return None  # part per-expert, part fused: no single conversion covers both
    return f"python -m shims convert-adapter {adapter_dir} {out} --to {needed}"


def _describe(found: str) -> str:
    return {PER_EXPERT: "per-expert LoRA modules", MIXED: "both per-expert and fused expert LoRA",
            MIXED_LAYOUTS: "fused expert LoRAs in both layouts"}.get(
        found, f"fused expert LoRA in the {found} layout")


def _known_failure(engine: str, found: str) -> str:
    if engine == "vllm" and found == "swapped":
        return " (peft 0.18's swapped layout fails to load in vLLM with a shape error)"
    return ""
