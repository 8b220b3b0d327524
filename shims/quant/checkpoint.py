"""Save and reload a model whose fused experts are shim-quantized 4-bit (a pre-quantized checkpoint).

Without this, ``save_pretrained`` writes the packed bytes under ``...experts.parametrizations.gate_up_proj.original``
and no quantization state: the file cannot be reloaded. With it, each 4-bit expert tensor is written the way
transformers writes a bitsandbytes ``Linear4bit`` weight, with the tensor name in place of ``weight``:

    model.layers.0.mlp.experts.gate_up_proj                                   packed 4-bit data (uint8)
    model.layers.0.mlp.experts.gate_up_proj.absmax / .quant_map               \
    model.layers.0.mlp.experts.gate_up_proj.nested_absmax / .nested_quant_map  > QuantState.as_dict(packed=True)
    model.layers.0.mlp.experts.gate_up_proj.quant_state.bitsandbytes__nf4     /

The config carries ``quantization_config``, so ``from_pretrained(dir)`` runs transformers' pre-quantized bnb path.
We hook into that same path: the bnb quantizer's ``get_weight_conversions`` also returns one ``WeightConverter`` per
expert tensor name whose operation rebuilds the QuantState with ``QuantState.from_dict`` (as ``Bnb4bitDeserialize``
does for Linear4bit), and ``set_param_for_module`` stores packed data + state directly in the 4-bit parametrization.
Nothing is dequantized or re-quantized on load.

Router weights stored 4-bit by :mod:`shims.quant.quant_router` are saved with exactly Linear4bit's keys (``...gate.weight``
+ ``.weight.absmax`` ...). Upstream's own bnb deserializer rebuilds them as a ``Params4bit``; ``set_param_for_module``
moves that into the router's 4-bit storage (a router is no Linear4bit: its forward would multiply packed bytes).

Packed (non-float) expert data without its quantization state is refused with an error naming the tensor: it is
never loaded as weights. Fused expert keys are kept out of transformers' reverse weight conversion on save (which
would otherwise split the packed bytes per expert as if they were a float (E, 2I, H) tensor), and so are bitsandbytes
``Linear4bit`` modules that the reversal would concatenate into one key (:func:`unmerged_4bit_modules`, lara_mini).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import weakref
from contextlib import contextmanager
from functools import wraps

from .bnb_config import is_bnb_4bit
from .forward import PARAMETRIZE_CACHE_TARGETS
from ..loader_generation import V5, targets_for
from .loader_v5 import v5_loader_needed
from .quant_router import ROUTER_WEIGHT, is_bnb_linear, is_router_path
from ..registry import Patch, Target, chain_undo, swap_attr
from .storage import (
    EXPERT_WEIGHT_NAMES,
    ExpertQuantError,
    install_packed_param,
    quantized_parametrization,
    quantized_tensor_names,
)

log = logging.getLogger("shims")

# QuantState.as_dict(packed=True) keys (bitsandbytes >= 0.41); the quant_state one carries the non-tensor fields.
STAT_NAMES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
               "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
STATE_ATTR = "_shims_quant_state"
ERROR_ATTR = "_shims_state_error"


def _quantized_tensors(model):
    """(key prefix, module, tensor name, parametrization) for every shim-quantized tensor of ``model`` (fused
    experts; router weights, which are then saved exactly as a Linear4bit weight)."""

    for module_name, module in model.named_modules():
        for name in quantized_tensor_names(module):
            yield (f"{module_name}." if module_name else ""), module, name, quantized_parametrization(module, name)


def quantized_expert_state_dict(model, state_dict: dict) -> dict:
    """Rewrite ``state_dict`` (of ``model``) so every 4-bit expert tensor is saved as packed data + QuantState keys."""
    for prefix, _, name, param in _quantized_tensors(model):
        stored = f"{prefix}parametrizations.{name}.original"
        if stored not in state_dict:
            continue
        state_dict[f"{prefix}{name}"] = state_dict.pop(stored)
        for stat, value in param.quant_state.as_dict(packed=True).items():
            state_dict[f"{prefix}{name}.{stat}"] = value
    return state_dict


def split_stat_key(key: str) -> tuple[str, str]:
    """("...experts.gate_up_proj", "absmax") for a saved QuantState key; (key, "") for the tensor itself."""
    for stat in STAT_NAMES:
        if key.endswith("." + stat):
            return key[: -len(stat) - 1], stat
    return key, ""


def _is_quantized_expert_key(key: str, owned: dict) -> bool:
    return split_stat_key(key)[0] in owned


def saved_quant_state(packed, stats: dict, hf_quantizer):
    """(QuantState, None) rebuilt from saved packed data + its QuantState keys, or (None, why it cannot be)."""
    from bitsandbytes.functional import QuantState

    if packed is None:
        return None, f"quantization state {sorted(stats)} without the packed data (incomplete checkpoint)"
    problem = _storage_problem(packed, hf_quantizer)
    if problem is not None:
        return None, problem
    try:
        return QuantState.from_dict(stats, device=packed.device), None
    except (KeyError, ValueError, AssertionError) as exc:
        return None, f"unreadable quantization state {sorted(stats)}: {exc!r}"


def packed_without_state_error(tensor_path: str, packed):

    return ExpertQuantError(
        f"{tensor_path}: the checkpoint stores packed {packed.dtype} data {tuple(packed.shape)} for this expert "
        f"tensor but no 4-bit quantization state ({tensor_path}.absmax, .quant_state.bitsandbytes__nf4 ...); "
        "refusing to load packed bytes as weights")


# --------------------------------------------------------------------------------------------------------------
# load: a WeightConverter per expert tensor name, its op, and set_param_for_module


def _source_patterns(name: str) -> dict[str, str]:
    r"""Regex source pattern -> QuantState.from_dict key ("" for the packed data itself).

    Anchored at the end of the key and at a name boundary (``\b``): ``up_proj`` must not match ``gate_up_proj``,
    ``down_proj`` must not match ``mlp.down_proj.weight`` of a dense layer, nor ``gate_up_proj`` its ``_bias``.
    """
    patterns = {rf"\b{re.escape(name)}$": ""}
    for stat in STAT_NAMES:
        patterns[rf"\b{re.escape(name)}\.{re.escape(stat)}$"] = stat
    return patterns


def _storage_problem(packed, hf_quantizer):
    """Why ``packed`` cannot be the saved bytes, or None. transformers 5.5/5.6 cast an un-renamed float key to the
    model dtype; with a float ``bnb_4bit_quant_storage`` that rewrites the packed bytes (NaN bit patterns are not
    preserved even by a widening cast), so such a tensor is refused rather than repaired."""
    import torch

    storage = getattr(getattr(hf_quantizer, "quantization_config", None), "bnb_4bit_quant_storage", None)
    if isinstance(storage, str):
        storage = getattr(torch, storage, None)
    if storage is None or packed.dtype == storage:
        return None
    return (f"packed 4-bit data arrived as {packed.dtype} but the checkpoint's quant_storage is {storage}: the "
            f"loader cast it and the packed bytes are lost (load with dtype={storage} or use uint8 quant_storage)")


def _make_ops():
    from transformers.core_model_loading import ConversionOps

    class _KeepAsSaved(ConversionOps):
        """Reverse of the deserialization: saving is done by quantized_expert_state_dict, nothing to undo here."""

        def convert(self, input_dict, *args, **kwargs):
            return input_dict

    class ExpertQuantStateDeserialize(ConversionOps):
        """Packed 4-bit expert data + its QuantState keys -> one tensor carrying the rebuilt QuantState.

        Never raises (transformers turns an op's exception into a logged conversion error and the tensor would be
        re-initialised): a problem is attached to the result and set_param_for_module raises it, naming the tensor.
        """

        def __init__(self, hf_quantizer, name: str):
            self.hf_quantizer = hf_quantizer  # also tells transformers 5.24's loader not to cast these tensors
            self.name = name
            self.stats = _source_patterns(name)

        def convert(self, input_dict, *args, full_layer_name=None, **kwargs):
            import torch

            values = {self.stats.get(k, k): (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
            packed = values.pop("", None)
            if packed is not None and not values:
                return {self.name: packed}  # float experts, or packed bytes without state: set_param decides
            state, problem = saved_quant_state(packed, values, self.hf_quantizer)
            out = (torch.empty(0, device="meta") if packed is None
                   else torch.nn.Parameter(packed, requires_grad=False))
            setattr(out, STATE_ATTR if problem is None else ERROR_ATTR, state if problem is None else problem)
            return {self.name: out}

        @property
        def reverse_op(self):
            return _KeepAsSaved()

    return ExpertQuantStateDeserialize


@functools.cache
def _op_class():
    return _make_ops()  # built once, on first use: importing this module must not import transformers


# What a pre-quantized checkpoint being loaded stores as 4-bit stacks, read in preprocess_model (which sees the
# checkpoint files) for get_weight_conversions (which does not): quantizer -> {module path: tensor names}.
_SAVED_STACKS = weakref.WeakKeyDictionary()


def expert_weight_converters(hf_quantizer) -> list:
    """One WeightConverter per fused expert tensor name, collecting its packed data and QuantState keys: the names
    transformers gives fused experts, and the stacks of other names this checkpoint holds (jetmoe
    ``input_linear.weight``, inkling's shared ``gate_proj``), matched with their module's name so that a Linear4bit
    ``weight`` elsewhere is left to bitsandbytes."""
    from transformers.core_model_loading import WeightConverter

    names = list(EXPERT_WEIGHT_NAMES)
    for path, stacks in sorted(_SAVED_STACKS.get(hf_quantizer, {}).items()):
        for name in stacks:
            if name not in EXPERT_WEIGHT_NAMES:
                names.append(f"{path.rpartition('.')[2]}.{name}" if path else name)
    out = []
    for name in dict.fromkeys(names):
        out.append(WeightConverter(source_patterns=list(_source_patterns(name)), target_patterns=name,
                                   operations=[_op_class()(hf_quantizer, name)]))
    return out


def _store_loaded(model, target_name: str, value) -> bool:
    """Store a deserialized 4-bit expert tensor; False when ``value`` is not one (let transformers handle it)."""

    module_path, _, name = target_name.rpartition(".")
    ours = getattr(value, STATE_ATTR, None) is not None or getattr(value, ERROR_ATTR, None) is not None
    if name not in EXPERT_WEIGHT_NAMES and not ours:
        return False
    error = getattr(value, ERROR_ATTR, None)
    if error is not None:
        raise ExpertQuantError(f"{target_name}: {error}; refusing to load it")
    state = getattr(value, STATE_ATTR, None)
    if state is None:
        if value.is_floating_point():
            return False
        raise packed_without_state_error(target_name, value)
    module = model.get_submodule(module_path) if module_path else model
    install_saved_expert(module, module_path, name, value.data, state)
    return True


def _store_loaded_router(model, target_name: str, value) -> bool:
    """Store a saved 4-bit router weight; False when ``value`` is not one.

    Router weights are saved with Linear4bit's keys, so upstream's own bnb deserializer rebuilds them as a
    ``Params4bit`` (and sets ``module.quant_state``, as it does for a Linear4bit). A router is no Linear4bit: its
    forward would multiply the packed bytes. The data + state go into the shims' 4-bit storage instead.
    """

    state = getattr(value, "quant_state", None)  # set only on a Params4bit: float quant_storage is packed too
    module_path, _, name = target_name.rpartition(".")
    if state is None or name != ROUTER_WEIGHT or not is_router_path(model, module_path):
        return False
    module = model.get_submodule(module_path)
    if is_bnb_linear(module):
        return False  # a router that is a Linear4bit (afmoe, hunyuan, jetmoe): bitsandbytes' own
    if getattr(module, "quant_state", None) is state:
        del module.quant_state
    install_saved_expert(module, module_path, name, value.data, state)
    return True


def install_saved_expert(module, module_path: str, name: str, packed, state) -> None:
    """Store saved packed data + its QuantState as ``module.<name>`` after checking that they describe each other."""

    expected = (state.shape.numel() + 1) // 2  # two 4-bit values per byte
    stored = packed.numel() * packed.element_size()
    if stored != expected:
        raise ExpertQuantError(f"{module_path}.{name}: packed data holds {stored} bytes, its quantization state "
                               f"describes {tuple(state.shape)} ({expected} bytes); refusing to load it")
    install_packed_param(module, name, packed, state, owner=module_path)
    log.debug("loaded %s.%s %s as packed 4-bit %s", module_path, name, tuple(state.shape), state.quant_type)


def saving_quantized_experts(original_state_dict):
    """Wrap a quantizer's ``get_state_dict_and_metadata`` so 4-bit experts are saved as packed data + QuantState."""

    @wraps(original_state_dict)
    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        state_dict, metadata = original_state_dict(self, model, *args, **kwargs)
        if not any(True for _ in _quantized_tensors(model)):
            return state_dict, metadata
        if state_dict is None:
            state_dict = model.state_dict()
        return quantized_expert_state_dict(model, dict(state_dict)), metadata

    return get_state_dict_and_metadata


def _is_load_only(conversion) -> bool:
    """A quantizer's deserialization converter (its ops carry ``hf_quantizer``, as transformers itself tests)."""
    return any(getattr(op, "hf_quantizer", None) is not None for op in getattr(conversion, "operations", ()) or ())


@contextmanager
def load_only_converters_left_out(model):
    """While reverting ``model``'s weight conversions for saving, leave out its load-only converters.

    A model loaded from a pre-quantized checkpoint remembers the quantizer's load-only converters (bnb's
    Bnb4bitDeserialize, ours) in ``model._weight_conversions``; they have no reverse_op, so saving (or exporting a
    merged copy) raised NotImplementedError. Their tensors are either already in serialized form (4-bit ones) or
    float tensors that the model's own converters revert, so the reversal needs none of them.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not _is_load_only(c)]
    try:
        yield
    finally:
        if conversions:
            model._weight_conversions = conversions


def unmerged_4bit_modules(model) -> set[str]:
    """Paths of the modules whose tensors are saved under their own names, not merged by the reverse conversion.

    transformers reverts a one-to-many load conversion (lara_mini: ``linear_attn.in_proj`` split into
    ``in_proj_qkv`` / ``in_proj_z`` / ``in_proj_b`` / ``in_proj_a``) by concatenating the targets on save. On
    bitsandbytes ``Linear4bit`` targets that concatenates their packed data, absmax and serialized QuantStates into
    one key that no loader can read (transformers 5.24, shims or not); a conversion with an operation (ergo on 5.25:
    its shared experts and router are stored transposed, ``Transpose(0, 1)``) runs it over the packed data and the
    QuantState keys on save (``IndexError`` on the 1-D absmax). Every module of such a group with a 4-bit
    member is left out of the reversal: its keys stay in the model's names, which the load-time converter does not
    match (its pattern ends on a name boundary), so transformers and bitsandbytes load them as they are.
    """
    conversions = [c.reverse_transform() for c in getattr(model, "_weight_conversions", None) or ()
                   if _reshapes(c) and not _is_load_only(c)]
    if not conversions:
        return set()
    from bitsandbytes.nn import Linear4bit

    groups: dict[tuple, list] = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        for index, conversion in enumerate(conversions):
            merged_key, pattern = conversion.rename_source_key(f"{path}.weight")
            if pattern is not None:
                groups.setdefault((index, merged_key), []).append((path, isinstance(module, Linear4bit)))
                break
    return {path for members in groups.values() if any(four_bit for _, four_bit in members)
            for path, _ in members}


def _reshapes(conversion) -> bool:
    """A conversion whose reversal changes tensors, not only names: several targets merged, or any operation."""
    return len(getattr(conversion, "target_patterns", ()) or ()) > 1 or bool(getattr(conversion, "operations", None))


_STATE_KEY = re.compile(r"^(.+)\.([^.]+)\.quant_state\.bitsandbytes__(?:nf4|fp4)$")


def saved_4bit_stacks(checkpoint_files) -> dict[str, tuple[str, ...]]:
    """Module path -> names of the tensors the checkpoint stores as 4-bit stacks (what the shims save): any 4-bit
    tensor not named ``weight``, and a ``weight`` whose saved quantization state is 3D (jetmoe's expert modules; a
    Linear4bit weight is 2D). Reads key names, and for ``weight`` keys the small packed state."""
    from safetensors import safe_open

    found: dict[str, list] = {}
    for path in checkpoint_files or ():
        if not str(path).endswith(".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = _STATE_KEY.match(key)
                if match is None:
                    continue
                module, name = match.group(1), match.group(2)
                if name == "weight" and len(_saved_shape(f, key)) != 3:
                    continue
                found.setdefault(module, []).append(name)
    return {module: tuple(names) for module, names in found.items()}


def _saved_shape(f, key: str) -> tuple:
    """The logical shape a saved ``...quant_state.bitsandbytes__nf4`` key records."""
    from bitsandbytes.utils import unpack_tensor_to_dict

    try:
        return tuple(unpack_tensor_to_dict(f.get_tensor(key)).get("shape", ()))
    except ValueError as exc:  # json.JSONDecodeError
        raise ExpertQuantError(
            f"{key}: not one saved quantization state ({exc}); a checkpoint whose save merged several 4-bit tensors "
            "into one key (transformers 5.x's reverse weight conversion concatenates Linear4bit packed data and "
            "their states, e.g. lara_mini in_proj_qkv / z / b / a -> linear_attn.in_proj) cannot be loaded; "
            "save the 4-bit model with the shims applied (they keep such modules unmerged), unquantized, or with "
            "shims.save_merged") from exc


def keeping_fused_experts(quantizer, checkpoint_files):
    """Wrap the quantizer's ``_convert_model_for_quantization`` for one pre-quantized load so that experts modules
    the checkpoint stores fused (shims format) stay fused.

    transformers 5.x swaps llama4's fused ``Llama4TextExperts`` for per-expert ``Linear4bit`` modules on every
    pre-quantized bitsandbytes load (``MODULES_TO_PATCH_FOR_QUANTIZATION``: the layout of 4-bit llama4 checkpoints
    made elsewhere). A checkpoint the shims saved holds the fused packed stacks instead: after the swap its keys
    matched nothing and the per-expert uint8 weights were "initialised" (``normal_`` on Byte). Checkpoints with
    per-expert keys are swapped as before."""
    fused = set(saved_4bit_stacks(checkpoint_files))
    convert = quantizer._convert_model_for_quantization

    def convert_keeping_fused(model, *args, **kwargs):
        kept = {path: model.get_submodule(path) for path in fused if _has_submodule(model, path)}
        result = convert(model, *args, **kwargs)
        for path, module in kept.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if parent._modules.get(name) is not module:
                parent._modules[name] = module
                log.debug("%s: kept fused (the checkpoint stores it as shim 4-bit stacks)", path)
        return result

    return convert_keeping_fused


def _has_submodule(model, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _install():
    import transformers.core_model_loading as cml
    import transformers.modeling_utils as mu
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original_set = cml.set_param_for_module
    set_signature = inspect.signature(original_set)
    original_conversions = Bnb4BitHfQuantizer.get_weight_conversions
    original_state_dict = Bnb4BitHfQuantizer.get_state_dict_and_metadata
    original_revert = cml.revert_weight_conversion
    keep_fused = CONVERT_TARGET.drift() == "ok" and PREPROCESS_TARGET.drift() == "ok"
    original_preprocess = Bnb4BitHfQuantizer.preprocess_model if keep_fused else None

    @wraps(original_set)
    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        if _store_loaded(model, target_name, param_value) or _store_loaded_router(model, target_name, param_value):
            bound = set_signature.bind(model, target_name, param_value, *args, **kwargs)
            bound.arguments["loading_info"].missing_keys.discard(target_name)
            return None
        return original_set(model, target_name, param_value, *args, **kwargs)

    @wraps(original_conversions)
    def get_weight_conversions(self, *args, **kwargs):
        upstream = original_conversions(self, *args, **kwargs)
        if not (getattr(self, "pre_quantized", False) and is_bnb_4bit(self)):
            return upstream
        return expert_weight_converters(self) + list(upstream)

    @wraps(original_revert)
    def revert_without_load_only(model, state_dict, *args, **kwargs):
        with load_only_converters_left_out(model):
            return original_revert(model, state_dict, *args, **kwargs)

    @wraps(original_revert)
    def revert_weight_conversion(model, state_dict, *args, **kwargs):
        owned = {f"{prefix}{name}": None for prefix, _, name, _ in _quantized_tensors(model)}
        unmerged = unmerged_4bit_modules(model)
        kept = {k: state_dict[k] for k in list(state_dict)
                if _is_quantized_expert_key(k, owned) or k.rpartition(".")[0] in unmerged
                or split_stat_key(k)[0].rpartition(".")[0] in unmerged}
        rest = {k: v for k, v in state_dict.items() if k not in kept}
        result = revert_without_load_only(model, rest, *args, **kwargs)
        result.update(kept)
        return result

    def preprocess_model(self, model, *args, **kwargs):
        if not (getattr(self, "pre_quantized", False) and is_bnb_4bit(self) and kwargs.get("checkpoint_files")):
            return original_preprocess(self, model, *args, **kwargs)
        _SAVED_STACKS[self] = saved_4bit_stacks(kwargs["checkpoint_files"])
        self._convert_model_for_quantization = keeping_fused_experts(self, kwargs["checkpoint_files"])
        try:
            return original_preprocess(self, model, *args, **kwargs)
        finally:
            del self._convert_model_for_quantization  # the instance attribute; the class method is untouched

    undo_preprocess = []
    if original_preprocess is not None:
        undo_preprocess.append(swap_attr(Bnb4BitHfQuantizer, "preprocess_model",
                                         wraps(original_preprocess)(preprocess_model)))
    return chain_undo(undo_preprocess + [
        swap_attr(cml, "set_param_for_module", set_param_for_module),
        swap_attr(Bnb4BitHfQuantizer, "get_weight_conversions", get_weight_conversions),
        swap_attr(Bnb4BitHfQuantizer, "get_state_dict_and_metadata", saving_quantized_experts(original_state_dict)),
        swap_attr(mu, "revert_weight_conversion", revert_weight_conversion),
        # Other callers (shims.merging.export writes merged float shards through it) only need the load-only converters
        # left out; their float expert tensors are reverted to the per-expert on-disk layout as usual.
        swap_attr(cml, "revert_weight_conversion", revert_without_load_only),
    ])


_TARGETS = (
    Target("transformers.core_model_loading", "set_param_for_module",
           ("model", "target_name", "param_value", "loading_info", "hf_quantizer")),
    Target("transformers.core_model_loading", "WeightConverter", ("source_patterns", "target_patterns", "operations")),
    Target("transformers.core_model_loading", "ConversionOps.convert"),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.get_weight_conversions"),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.get_state_dict_and_metadata", ("model",)),
    Target("transformers.modeling_utils", "revert_weight_conversion", ("model", "state_dict")),
    Target("transformers.core_model_loading", "revert_weight_conversion", ("model", "state_dict")),
    Target("bitsandbytes.functional", "QuantState.from_dict", ("qs_dict", "device")),
    Target("bitsandbytes.functional", "QuantState.as_dict", ("packed",)),
)


# Optional: where a pre-quantized load swaps fused experts for per-expert modules (llama4), keep those the checkpoint
# stores fused; without these symbols there is no swap to undo.
CONVERT_TARGET = Target("transformers.quantizers.base", "HfQuantizer._convert_model_for_quantization", ("model",))
PREPROCESS_TARGET = Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.preprocess_model",
                           ("model",))


PATCHES: tuple = (
    Patch(
        name="prequantized_experts_checkpoint",
        summary="save_pretrained of a model with 4-bit experts writes packed data + QuantState (bnb's packed "
                "as_dict keys); from_pretrained reads them back into the same 4-bit storage, without float copies",
        # On transformers 4.x these symbols do not exist and the patch is not needed (quant_legacy saves there).
        **targets_for(V5, required=_TARGETS + PARAMETRIZE_CACHE_TARGETS, optional=(CONVERT_TARGET, PREPROCESS_TARGET)),
        needed=v5_loader_needed,
        install=_install,
    ),
)
