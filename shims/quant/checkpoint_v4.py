"""Load a 4-bit MoE checkpoint written by transformers 4.x (per-expert ``Linear4bit`` keys) on 5.x, as fused 4-bit
experts, without dequantizing and re-quantizing.

transformers 4.57 ``load_in_4bit`` + ``save_pretrained`` writes every expert as its own ``Linear4bit``::

    model.layers.0.mlp.experts.3.gate_proj.weight                       packed uint8 (numel/2, 1)
    model.layers.0.mlp.experts.3.gate_proj.weight.absmax / .quant_map   \\
    ....weight.nested_absmax / .nested_quant_map (double quant only)     > QuantState.as_dict(packed=True)
    ....weight.quant_state.bitsandbytes__nf4                            /

(mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2``). 5.x fuses experts into ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I) with the model's own ``WeightConverter`` (stack the experts, concatenate gate and up). That
converter also catches the packed bytes and stacks them as if they were weights; natively 5.x fails with a size
mismatch, and the shims' fused loader refuses packed data without state.

Here each such converter of the model gets a twin, placed right before it, that also collects the QuantState keys and
fuses the per-expert 4-bit tensors directly (:func:`fuse_per_expert_quant_states`). bitsandbytes quantizes the
row-major flattened tensor in blocks of ``blocksize`` elements, two elements per byte. The fused tensor's expert e is
gate_e then up_e, flattened; so when every per-expert tensor is whole blocks (numel divisible by the blocksize, which
is even), the fused packed bytes are the per-expert packed bytes concatenated in that order, and its absmax the
per-expert absmax concatenated: the fused tensor dequantizes to exactly 4.x's per-expert weights.

Double quantization stores each tensor's absmax 8-bit with its own nested statistics (an offset, and a scale per 256
blocks), which do not concatenate into one nested state. Those absmax are dequantized to float32 (exactly as
``dequantize_4bit`` does before using them) and the fused state is stored un-nested: the weights stay bit-exact, the
absmax take 4 bytes per block instead of ~1 (+0.375 bit per weight: 4.13 -> 4.5 bits). Per-expert tensors that are
not whole blocks are refused (re-quantizing would change the weights); no real MoE dimension we know of hits that.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from functools import wraps

from .checkpoint import ERROR_ATTR, STAT_NAMES, STATE_ATTR, saved_quant_state, split_stat_key
from .bnb_config import is_bnb_4bit
from ..loader_generation import V5, targets_for
from .loader_v5 import v5_loader_needed
from ..registry import Patch, Target, chain_undo, swap_attr
from .storage import EXPERT_WEIGHT_NAMES

log = logging.getLogger("shims")

# Longest first: transformers 5.5/5.6 take the first alternative that matches, and `weight` is a prefix of them all.
_STATS_LONGEST_FIRST = tuple(sorted(STAT_NAMES, key=len, reverse=True))


class PerExpertCheckpointError(ValueError):
    """Per-expert 4-bit tensors that cannot be fused exactly (mixed settings, blocks across experts, missing keys)."""


# --------------------------------------------------------------------------------------------------------------
# the fusion itself


def float32_absmax(state):
    """The per-block absmax ``dequantize_4bit`` uses for ``state``: un-nested exactly as bitsandbytes does it."""
    import bitsandbytes.functional as F
    import torch

    if not state.nested:
        return state.absmax
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax if absmax.dtype == torch.float32 else absmax.float()


def _check_uniform(parts) -> None:
    """Every per-expert tensor must share quant type, blocksize, dtype and code, and be whole 4-bit blocks."""
    import torch

    first = parts[0][0][1]
    experts = len(parts[0])
    for p, part in enumerate(parts):
        if len(part) != experts:
            raise PerExpertCheckpointError(f"part {p} has {len(part)} experts, part 0 has {experts}")
        shape = part[0][1].shape
        for e, (_, state) in enumerate(part):
            same = (state.quant_type, state.blocksize, state.dtype) == (first.quant_type, first.blocksize, first.dtype)
            if not same or tuple(state.shape) != tuple(shape) or not torch.equal(state.code, first.code):
                raise PerExpertCheckpointError(
                    f"expert {e} of part {p}: {state.quant_type}/{state.blocksize}/{state.dtype} {tuple(state.shape)} "
                    f"differs from {first.quant_type}/{first.blocksize}/{first.dtype} {tuple(shape)}")
        if math.prod(shape) % first.blocksize:
            raise PerExpertCheckpointError(
                f"per-expert tensor {tuple(shape)} ({math.prod(shape)} elements) is not whole "
                f"{first.blocksize}-element 4-bit blocks: a block would straddle two experts, so the fused tensor "
                "cannot reuse these bytes")
    trailing = {tuple(part[0][1].shape[1:]) for part in parts}
    if len(trailing) != 1:
        raise PerExpertCheckpointError(f"parts cannot be concatenated along rows: trailing shapes {sorted(trailing)}")


def fuse_per_expert_quant_states(parts):
    """Fuse per-expert 4-bit tensors into one (E, sum of rows, ...) 4-bit tensor, reusing their bytes.

    ``parts``: one list per source tensor in concatenation order (gate, up for gate_up_proj; down alone), each a list
    over experts of ``(packed, QuantState)``. Returns ``(packed, QuantState)``: expert e of the result is
    part 0's expert e then part 1's expert e (rows), dequantizing to exactly those tensors. The state is un-nested
    (float32 absmax) when the inputs were double-quantized (see the module docstring). Raises
    PerExpertCheckpointError when that cannot be exact.
    """
    import bitsandbytes.functional as F
    import torch

    _check_uniform(parts)
    first = parts[0][0][1]
    packed, absmax = [], []
    for e in range(len(parts[0])):
        for part in parts:
            data, state = part[e]
            packed.append(data.reshape(-1, 1))  # Linear4bit's (numel/2, 1) layout; any quant_storage
            absmax.append(float32_absmax(state))
    rows = sum(part[0][1].shape[0] for part in parts)
    shape = torch.Size((len(parts[0]), rows, *parts[0][0][1].shape[1:]))
    state = F.QuantState(absmax=torch.cat(absmax), shape=shape, dtype=first.dtype, blocksize=first.blocksize,
                         code=first.code, quant_type=first.quant_type)
    return torch.cat(packed), state


# --------------------------------------------------------------------------------------------------------------
# the conversion op and the converter twin


def _make_op_class():
    from transformers.core_model_loading import ConversionOps

    class PerExpertQuantStateFuse(ConversionOps):
        """Per-expert packed 4-bit data + QuantState keys (4.x checkpoint) -> one fused 4-bit expert tensor.

        Like the fused deserializer of :mod:`shims.quant.checkpoint` it never raises (transformers would log the exception
        and re-initialise the tensor): a problem is attached to the result and set_param_for_module raises it.
        Per-expert float tensors (experts skipped at quantization) go through the model's own ops unchanged.
        No reverse_op (like bitsandbytes' own deserializer): a 4-bit model is saved fused (:mod:`shims.quant.checkpoint`
        leaves load-only converters out of the reversal).
        """

        def __init__(self, hf_quantizer, roles, operations):
            self.hf_quantizer = hf_quantizer  # marks a load-only op; 5.24 then keeps checkpoint dtypes as stored
            self.roles = dict(roles)  # twin source pattern -> (model source pattern, stat; "" for the data)
            self.bases = list(dict.fromkeys(base for base, _ in self.roles.values()))
            self.operations = list(operations)

        def _grouped(self, input_dict):
            """{model source pattern: {stat ("" for the packed data): [tensor per expert]}}, in concatenation order."""
            grouped = {base: {} for base in self.bases}
            for key, tensors in input_dict.items():
                base, stat = self.roles[key.removeprefix("^")]
                grouped[base][stat] = tensors if isinstance(tensors, list) else [tensors]
            return grouped

        def convert(self, input_dict, *args, target_patterns=None, **kwargs):
            import torch

            target = target_patterns[0]
            grouped = self._grouped(input_dict)
            if not any(stat for stats in grouped.values() for stat in stats):
                # the model's ops find their inputs by the model's source patterns (Concatenate orders gate, up by
                # them), not by this twin's spellings, which the loader passes as source_patterns
                out = {base: grouped[base][""] for base in self.bases}
                kwargs["source_patterns"] = list(self.bases)
                for op in self.operations:
                    out = op.convert(out, *args, target_patterns=target_patterns, **kwargs)
                return out
            parts, problem = _per_expert_states(grouped, self.hf_quantizer)
            out = torch.empty(0, device="meta")
            if problem is None:
                try:
                    packed, state = fuse_per_expert_quant_states(parts)
                except PerExpertCheckpointError as exc:
                    problem = str(exc)
                else:
                    out = torch.nn.Parameter(packed, requires_grad=False)
            setattr(out, STATE_ATTR if problem is None else ERROR_ATTR, state if problem is None else problem)
            return {target: out}

    return PerExpertQuantStateFuse


def _per_expert_states(grouped, hf_quantizer):
    """([[(packed, QuantState) per expert] per base], None) or (None, why not)."""
    parts = []
    for base, stats in grouped.items():
        packed = stats.get("", [])
        if not packed:
            return None, f"{base}: quantization state without the packed data (incomplete checkpoint)"
        if any(len(v) != len(packed) for v in stats.values()):
            counts = {k or "data": len(v) for k, v in stats.items()}
            return None, f"{base}: per-expert keys are incomplete ({counts} tensors)"
        part = []
        for e, data in enumerate(packed):
            state, problem = saved_quant_state(data, {k: v[e] for k, v in stats.items() if k}, hf_quantizer)
            if problem is not None:
                return None, f"{base} expert {e}: {problem}"
            part.append((data, state))
        parts.append(part)
    return parts, None


@functools.cache
def _op_class():
    return _make_op_class()  # built once, on first use: importing this module must not import transformers


def _fusable(converter) -> bool:
    """A model converter that stacks per-expert ``...weight`` tensors into one fused expert tensor, concatenating
    parts along rows only (the cases where fused bytes are concatenated per-expert bytes)."""
    import transformers.core_model_loading as cml

    from .loader_v5 import _stackable_ops

    ops = getattr(converter, "operations", ())
    targets = list(getattr(converter, "target_patterns", ()))
    if not isinstance(converter, cml.WeightConverter) or len(targets) != 1 or not _stackable_ops(ops):
        return False
    if any(getattr(op, "dim", None) != 1 for op in ops[1:]):
        return False
    return targets[0].rpartition(".")[2] in EXPERT_WEIGHT_NAMES and all(
        s.endswith(".weight") for s in _sources(converter))


def _sources(converter) -> list[str]:
    return list(getattr(converter, "_original_source_patterns", None) or converter.source_patterns)


def _twin_pattern(base: str, stat: str) -> str:
    """The twin's source pattern for ``base`` (+ ``.stat``). The loader files each key under the converter that owns
    its matching pattern STRING (a dict keyed by pattern), so the twin must not reuse the model converter's strings:
    the last dot is written ``[.]``, the same regex with a different spelling."""
    head, _, tail = base.rpartition(".")
    return f"{head}[.]{tail}" + (f".{stat}" if stat else "")


def per_expert_twin(converter, hf_quantizer):
    """A converter collecting ``converter``'s per-expert tensors AND their QuantState keys (None if not fusable)."""
    from transformers.core_model_loading import WeightConverter

    if not _fusable(converter):
        return None
    bases = _sources(converter)
    # Stat patterns first (5.5/5.6 take the first alternative that matches; `weight` is a prefix of every stat key).
    roles = {_twin_pattern(base, stat): (base, stat) for stat in _STATS_LONGEST_FIRST for base in bases}
    roles.update({_twin_pattern(base, ""): (base, "") for base in bases})
    targets = list(getattr(converter, "_original_target_patterns", None) or converter.target_patterns)
    op = _op_class()(hf_quantizer, roles, converter.operations)
    if hasattr(converter, "copy"):  # 5.24: keeps the converter's scope (sub-model prefix)
        return converter.copy(list(roles), targets, operations=[op])
    return WeightConverter(source_patterns=list(roles), target_patterns=targets, operations=[op])


def with_per_expert_twins(conversions, hf_quantizer) -> list:
    """``conversions`` with a per-expert 4-bit twin right before each fusable expert converter (the first converter
    that matches a key takes it, so the twin sees 4.x's packed keys before the float converter does)."""
    out = []
    for conversion in conversions:
        twin = per_expert_twin(conversion, hf_quantizer)
        if twin is not None:
            out.append(twin)
        out.append(conversion)
    return out


def _install():
    import transformers.modeling_utils as mu

    original = mu.get_model_conversion_mapping

    @wraps(original)
    def get_model_conversion_mapping(model, key_mapping=None, hf_quantizer=None, *args, **kwargs):
        conversions = original(model, key_mapping, hf_quantizer, *args, **kwargs)
        if hf_quantizer is None or not getattr(hf_quantizer, "pre_quantized", False) or not is_bnb_4bit(hf_quantizer):
            return conversions
        return with_per_expert_twins(conversions, hf_quantizer)

    return chain_undo([swap_attr(mu, "get_model_conversion_mapping", get_model_conversion_mapping)])


# --------------------------------------------------------------------------------------------------------------
# what a checkpoint folder holds (for the harness)

_PER_EXPERT_4BIT = re.compile(r"\.experts\.\d+\.\w+\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_FUSED_4BIT = re.compile(rf"\.experts\.({'|'.join(EXPERT_WEIGHT_NAMES)})\.quant_state\.bitsandbytes__(nf4|fp4)$")
_ROUTER_4BIT = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|router)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_ROUTER_FLOAT = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|router)\.weight$")
_NESTED = re.compile(r"\.nested_absmax$")


def checkpoint_keys(path) -> list[str]:
    """Every tensor name of the safetensors checkpoint in folder ``path`` (sharded or not), without reading data."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    keys = []
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as handle:
            keys.extend(handle.keys())
    return keys


def describe_prequantized(path) -> dict:
    """What kind of checkpoint folder ``path`` is, from config.json and the tensor names (no tensor is read).

    ``format``: "4.x per-expert" (transformers 4.x Linear4bit experts), "5.x shims fused" (fused 4-bit experts as
    :mod:`shims.quant.checkpoint` / :mod:`shims.quant.quant_legacy` write them), "not 4-bit" (no 4-bit expert keys) or "mixed".
    ``quant_type`` ("nf4"/"fp4"/None), ``double_quant`` (nested absmax present), ``routers_4bit`` (a router weight
    with 4-bit state), ``routers_float`` (a router weight without), ``model_type``, ``load_in_4bit`` (config).
    """
    keys = checkpoint_keys(path)
    with open(os.path.join(path, "config.json")) as handle:
        config = json.load(handle)
    qconfig = config.get("quantization_config") or {}
    per_expert = [m for m in map(_PER_EXPERT_4BIT.search, keys) if m]
    fused = [m for m in map(_FUSED_4BIT.search, keys) if m]
    kinds = [name for name, hits in (("4.x per-expert", per_expert), ("5.x shims fused", fused)) if hits]
    quant_types = sorted({m.groups()[-1] for m in per_expert + fused})
    return {
        "format": kinds[0] if len(kinds) == 1 else ("mixed" if kinds else "not 4-bit"),
        "model_type": config.get("model_type"),
        "load_in_4bit": bool(qconfig.get("load_in_4bit")),
        "quant_type": quant_types[0] if len(quant_types) == 1 else (quant_types or None),
        "double_quant": any(_NESTED.search(k) for k in keys),
        "expert_tensors_4bit": len(per_expert) + len(fused),
        "routers_4bit": any(_ROUTER_4BIT.search(k) for k in keys),
        "routers_float": any(_ROUTER_FLOAT.search(k) for k in keys) and not any(_ROUTER_4BIT.search(k) for k in keys),
    }


_TARGETS = (
    Target("transformers.modeling_utils", "get_model_conversion_mapping", ("model", "key_mapping", "hf_quantizer")),
    Target("transformers.core_model_loading", "WeightConverter", ("source_patterns", "target_patterns", "operations")),
    Target("transformers.core_model_loading", "MergeModulelist"),
    Target("transformers.core_model_loading", "Concatenate"),
    Target("bitsandbytes.functional", "dequantize_blockwise"),
)


PATCHES: tuple = (
    Patch(
        name="per_expert_4bit_checkpoint",
        summary="from_pretrained of a 4-bit MoE checkpoint written by transformers 4.x (per-expert Linear4bit keys) "
                "fuses the saved per-expert packed data + QuantState into fused 4-bit experts, bit-exact, no "
                "re-quantization (double-quant absmax stored un-nested float32)",
        **targets_for(V5, required=_TARGETS),
        needed=v5_loader_needed,
        install=_install,
    ),
)
