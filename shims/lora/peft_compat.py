"""peft <-> transformers version-compat patches.

weight_converter_kwargs (Bug B)
    peft 0.19.x builds adapter weight converters with
    ``WeightConverter(..., distributed_operation=..., quantization_operation=...)``. transformers 5.6.0+
    dropped those keywords from ``WeightConverter.__init__`` (they became plain attributes), so
    ``PeftModel.from_pretrained`` raises TypeError for every model type with an MoE conversion mapping.
    The patch lets ``WeightConverter.__init__`` accept the two keywords and assigns them after construction,
    which is what peft >= 0.20 does itself.

all_linear_moe (Bug C)
    peft 0.19.x remaps v4 MoE target names to v5 fused parameters in ``_convert_peft_config_moe`` and does
    ``set(peft_config.target_modules)``; with the string ``"all-linear"`` (or any regex string) that yields a
    set of single characters and ``get_peft_model`` fails with "Target modules {'a', 'e', ...} not found".
    A string cannot name v4 expert modules one by one, so there is nothing for that remap to do: the patch
    skips it for string ``target_modules`` and peft's ordinary string handling (all-linear expansion, regex
    matching) runs unchanged.

adapter_model_keys
    peft >= 0.19 passes every adapter it loads on transformers 5.x through the model's checkpoint conversion
    (``convert_peft_adapter_state_dict_for_transformers``), renamings included. Those renamings are written for the
    original checkpoint names, but peft saves adapters in the model's own names; a renaming whose pattern also matches
    a name the model already uses rewrites a correct key into one no LoRA parameter has. transformers 5.24's
    inkling2_text / inkling2_loop_text renaming of ``sconv.weight_proj`` to ``sconv.weight_proj.weight`` (for the
    original checkpoint's bare ``weight_proj`` tensor; its pattern is not anchored at the key's end) turns the
    saved LoRA keys ``...sconv.weight_proj.lora_A.weight``
    into ``...sconv.weight_proj.weight.lora_A.default.weight``: peft only warns about missing keys and the reloaded
    adapter keeps its fresh init there (lora_B = 0), so it computes something else than the trained model. The patch
    passes keys that already name a LoRA tensor of the model through unchanged and converts only the others (v4
    per-expert keys, keys of the original checkpoint's naming).
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap

from ..registry import Patch, Target, chain_undo, swap_attr

log = logging.getLogger("shims")

_CONVERTER_KWARGS = ("distributed_operation", "quantization_operation")
_TF_LOADING = "transformers.core_model_loading"
_PEFT_CONVERSION = "peft.utils.transformers_weight_conversion"


# --------------------------------------------------------------------------------------------------
# weight_converter_kwargs
# --------------------------------------------------------------------------------------------------
def _weight_converter_cls():
    import importlib

    return importlib.import_module(_TF_LOADING).WeightConverter


def _converter_rejects_kwargs(cls) -> bool:
    # follow_wrapped=False: judge the __init__ actually installed (ours once patched), not what it wraps.
    params = inspect.signature(cls.__init__, follow_wrapped=False).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return False
    return any(name not in params for name in _CONVERTER_KWARGS)


def _peft_passes_converter_kwargs() -> bool:
    """True when peft's adapter weight mapping constructs converters with the two keywords.

    Read from the source of ``build_peft_weight_mapping`` (a call with a ``distributed_operation=`` keyword),
    because the failure only happens while loading an adapter and cannot be probed cheaply.
    """
    import importlib

    module = importlib.import_module(_PEFT_CONVERSION)
    source = textwrap.dedent(inspect.getsource(module.build_peft_weight_mapping))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and any(kw.arg in _CONVERTER_KWARGS for kw in node.keywords):
            return True
    return False


def _weight_converter_needed() -> str | None:
    try:
        cls = _weight_converter_cls()
    except (ImportError, AttributeError):
        return "transformers has no WeightConverter (4.x loading path)"
    if not _converter_rejects_kwargs(cls):
        return "WeightConverter accepts distributed_operation/quantization_operation"
    try:
        passes = _peft_passes_converter_kwargs()
    except ImportError:
        return "peft has no transformers v5 weight conversion module"
    except (OSError, TypeError) as exc:  # source not available (e.g. a zipped install)
        return f"cannot inspect peft's build_peft_weight_mapping ({exc})"
    if not passes:
        return "peft sets distributed_operation/quantization_operation after construction"
    return None


def _install_weight_converter_kwargs():
    cls = _weight_converter_cls()
    original_init = cls.__init__

    @functools.wraps(original_init)
    def init_accepting_kwargs(self, *args, distributed_operation=None, quantization_operation=None, **kwargs):
        original_init(self, *args, **kwargs)
        # Same meaning as in transformers 5.5 (dataclass fields) and peft >= 0.20 (set afterwards).
        if distributed_operation is not None:
            self.distributed_operation = distributed_operation
        if quantization_operation is not None:
            self.quantization_operation = quantization_operation

    init_accepting_kwargs.__shims_patched__ = True
    return swap_attr(cls, "__init__", init_accepting_kwargs)


# --------------------------------------------------------------------------------------------------
# all_linear_moe
# --------------------------------------------------------------------------------------------------
def _convert_moe_fn():
    import importlib

    return importlib.import_module(_PEFT_CONVERSION)._convert_peft_config_moe


def _moe_conversion_mangles_strings(fn) -> bool:
    """Run the remap on a throwaway "all-linear" config and see whether it became a set of characters."""
    from peft import LoraConfig

    params = list(inspect.signature(fn).parameters)
    if len(params) < 2 or params[1] != "model_type":
        # Newer peft passes the model itself and resolves string targets against it.
        return False
    probe = LoraConfig(target_modules="all-linear")
    fn(probe, "mixtral")
    targets = probe.target_modules
    return not isinstance(targets, str) and "a" in set(targets or ())


def _all_linear_needed() -> str | None:
    try:
        fn = _convert_moe_fn()
    except ImportError:
        return "peft has no transformers v5 MoE config conversion"
    except AttributeError:
        return "peft has no _convert_peft_config_moe"
    try:
        import transformers  # noqa: F401
        from transformers import conversion_mapping  # noqa: F401
    except ImportError:
        return "transformers has no conversion mapping (4.x)"
    if not _moe_conversion_mangles_strings(fn):
        return "peft keeps string target_modules intact in its MoE config conversion"
    return None


def _install_all_linear():
    import importlib

    module = importlib.import_module(_PEFT_CONVERSION)
    original = module._convert_peft_config_moe

    @functools.wraps(original)
    def convert_moe_keeping_strings(peft_config, *args, **kwargs):
        if isinstance(getattr(peft_config, "target_modules", None), str):
            # "all-linear" / a regex: matched by peft against the v5 model as written; no v4 names to remap.
            log.debug("shims: skipping MoE target remap for string target_modules %r", peft_config.target_modules)
            return None
        return original(peft_config, *args, **kwargs)

    convert_moe_keeping_strings.__shims_patched__ = True
    return chain_undo([swap_attr(module, "_convert_peft_config_moe", convert_moe_keeping_strings)])


# --------------------------------------------------------------------------------------------------
# adapter_model_keys
# --------------------------------------------------------------------------------------------------
_ADAPTER_CONVERT = "convert_peft_adapter_state_dict_for_transformers"


class AdapterKeyConflict(ValueError):
    """An adapter holds a key in the model's naming and another key that converts to the same name."""


def _adapter_convert_module():
    import importlib

    return importlib.import_module(_PEFT_CONVERSION)


def _adapter_model_keys_needed() -> str | None:
    try:
        module = _adapter_convert_module()
    except ImportError:
        return "peft has no transformers v5 weight conversion module"
    fn = getattr(module, _ADAPTER_CONVERT, None)
    if fn is None:
        return "peft does not pass loaded adapters through transformers' checkpoint conversion"
    if getattr(fn, "__shims_patched__", False):
        return "the installed conversion already loads keys in the model's naming as saved"
    # Whether a renaming hits a model name depends on the arch's conversion table, known only at load time: where
    # none does, the wrapper converts exactly what peft converts.
    return None


def serialized_lora_keys(model, adapter_name: str) -> set[str]:
    """The names peft saves the model's LoRA tensors of ``adapter_name`` under: the model's names without the
    adapter-name component after a ``lora_*`` component (``...q_proj.lora_A.default.weight`` ->
    ``...q_proj.lora_A.weight``, ``...lora_embedding_A.default`` -> ``...lora_embedding_A``)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    keys = set()
    for name in names:
        parts = name.split(".")
        kept = [part for i, part in enumerate(parts)
                if not (part == adapter_name and i > 0 and parts[i - 1].startswith("lora_"))]
        if len(kept) < len(parts):
            keys.add(".".join(kept))
    return keys


def _install_adapter_model_keys():
    module = _adapter_convert_module()
    original = getattr(module, _ADAPTER_CONVERT)

    @functools.wraps(original)
    def convert_keeping_model_keys(model, peft_config, adapter_state_dict, adapter_name="default", *args, **kwargs):
        model_keys = serialized_lora_keys(model, adapter_name)
        kept = {k: v for k, v in adapter_state_dict.items() if k in model_keys}
        if not kept:
            return original(model, peft_config, adapter_state_dict, adapter_name, *args, **kwargs)
        rest = {k: v for k, v in adapter_state_dict.items() if k not in kept}
        converted = original(model, peft_config, rest, adapter_name, *args, **kwargs) if rest else {}
        clash = sorted(set(converted) & set(kept))
        if clash:
            raise AdapterKeyConflict(f"adapter holds {clash[0]!r} and other keys that convert to it "
                                     f"({len(clash)} such keys); which one to load is ambiguous")
        log.debug("shims: %d adapter keys already in the model's naming loaded without conversion", len(kept))
        return {**converted, **kept}

    convert_keeping_model_keys.__shims_patched__ = True
    return chain_undo([swap_attr(module, _ADAPTER_CONVERT, convert_keeping_model_keys)])


PATCHES = (
    Patch(
        name="weight_converter_kwargs",
        summary="WeightConverter accepts distributed_operation/quantization_operation (peft 0.19 + transformers>=5.6)",
        # Optional: both symbols are absent on transformers 4.x / peft 0.18, where needed() says why.
        targets=(),
        optional_targets=(Target(_TF_LOADING, "WeightConverter.__init__"),  # the symbol the patch replaces
                          Target(_PEFT_CONVERSION, "build_peft_weight_mapping")),
        needed=_weight_converter_needed,
        install=_install_weight_converter_kwargs,
    ),
    Patch(
        name="all_linear_moe",
        summary='target_modules="all-linear" (or a regex) is not split into characters by peft\'s MoE remap',
        targets=(),
        optional_targets=(Target(_PEFT_CONVERSION, "_convert_peft_config_moe"),),
        needed=_all_linear_needed,
        install=_install_all_linear,
    ),
    Patch(
        name="adapter_model_keys",
        summary="adapter keys already in the model's naming load unconverted (peft applied transformers' checkpoint "
                "renamings to them: inkling2's weight_proj LoRA was lost on reload)",
        targets=(),
        optional_targets=(Target(_PEFT_CONVERSION, _ADAPTER_CONVERT,
                                 expects=("model", "peft_config", "adapter_state_dict", "adapter_name")),),
        needed=_adapter_model_keys_needed,
        install=_install_adapter_model_keys,
    ),
)
