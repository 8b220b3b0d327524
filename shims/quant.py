"""4-bit quantization of fused MoE expert parameters (transformers 5.x).

Upstream (all 5.x checked, 5.5 ... 5.24) quantizes only ``nn.Linear`` under ``BitsAndBytesConfig(load_in_4bit=True)``:
the fused 3D expert tensors (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); gpt_oss transposed, with float
biases) stay in 16/32-bit. This module makes them real 4-bit.

Design: each expert tensor is stored with bitsandbytes' own storage (packed 4-bit data + ``QuantState``) as the
``original`` of a ``torch.nn.utils.parametrize`` parametrization (:class:`Packed4bitExperts`). Reading
``module.gate_up_proj`` dequantizes on the fly, so every experts implementation (grouped_mm, batched_mm, eager) runs
unchanged and peft sees the logical 3D shape and the compute dtype. While one experts module runs its forward the
dequantized tensor is cached (see :mod:`shims.forward`) and dropped when that forward returns: there is no
persistent float copy. (During training autograd keeps what the matmuls saved for backward, as for any layer;
gradient checkpointing bounds that to one layer.)

Experts are found by STRUCTURE (3D tensors named ``gate_up_proj``/``up_proj`` and ``down_proj``), not by class name.
They are quantized tensor by tensor while the checkpoint is read (``set_param_for_module`` is wrapped), so the load
peak is the packed model plus one fused float tensor; a sweep after loading catches any expert tensor that did
not pass through that path (e.g. initialised because it was missing from the checkpoint).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from functools import wraps
from typing import Iterator

from .registry import Patch, Target, chain_undo, swap_attr

log = logging.getLogger("shims")

# Canonical order = the order transformers registers them; peft nests its ParamWrappers in this order.
EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
_BIAS_SUFFIX = "_bias"


class ExpertQuantError(RuntimeError):
    """An expert tensor the shim cannot handle: wrong shape, or quantized data without its quantization state."""


@dataclass(frozen=True)
class QuantSettings:
    """The subset of BitsAndBytesConfig that decides how an expert tensor is stored."""

    quant_type: str = "nf4"
    compress_statistics: bool = False
    compute_dtype: "object" = None  # torch.dtype; None -> the tensor's own dtype
    quant_storage: "object" = None  # torch.dtype; None -> uint8
    blocksize: int | None = None  # None -> bitsandbytes' default

    @classmethod
    def from_bnb_config(cls, cfg) -> "QuantSettings":
        import torch

        def as_dtype(value, default):
            if value is None:
                return default
            if isinstance(value, str):
                return getattr(torch, value)
            return value

        return cls(
            quant_type=getattr(cfg, "bnb_4bit_quant_type", "nf4"),
            compress_statistics=bool(getattr(cfg, "bnb_4bit_use_double_quant", False)),
            compute_dtype=as_dtype(getattr(cfg, "bnb_4bit_compute_dtype", None), torch.float32),
            quant_storage=as_dtype(getattr(cfg, "bnb_4bit_quant_storage", None), torch.uint8),
        )


def _torch_nn():
    import torch
    import torch.nn.utils.parametrize as P

    return torch, P


class _Packed4bitBase:
    """Marker so that isinstance checks work without importing torch at module import."""


def _make_parametrization_class():
    torch, _ = _torch_nn()

    class Packed4bitExperts(torch.nn.Module, _Packed4bitBase):
        """Parametrization: packed bitsandbytes 4-bit data (the ``original``) -> the logical float tensor."""

        def __init__(self, quant_state, settings: QuantSettings, owner: str):
            super().__init__()
            self.quant_state = quant_state
            self.settings = settings
            self.owner = owner

        @property
        def logical_shape(self):
            if self.quant_state is None:
                raise ExpertQuantError(f"{self.owner}: 4-bit expert data has no quantization state (QuantState)")
            return tuple(self.quant_state.shape)

        def forward(self, packed):
            import bitsandbytes.functional as F

            if self.quant_state is None:
                raise ExpertQuantError(
                    f"{self.owner}: 4-bit expert data has no quantization state (QuantState); expected one "
                    "recorded when it was quantized (refusing to read packed bytes as weights)"
                )
            if packed.dtype != self.settings.quant_storage:
                # e.g. a float quant_storage cast by model.to(dtype): the bytes are no longer the packed values.
                raise ExpertQuantError(
                    f"{self.owner}: packed 4-bit storage has dtype {packed.dtype}, expected "
                    f"{self.settings.quant_storage} (was the model cast after quantization?)"
                )
            if self.quant_state.absmax.device != packed.device:
                self.quant_state.to(packed.device)
            with torch.no_grad():
                return F.dequantize_4bit(packed, self.quant_state)

        def extra_repr(self) -> str:
            qs = self.quant_state
            shape = None if qs is None else tuple(qs.shape)
            return (f"shape={shape}, quant_type={self.settings.quant_type}, "
                    f"double_quant={self.settings.compress_statistics}, dtype={None if qs is None else qs.dtype}")

    return Packed4bitExperts


_PARAM_CLASS = None


def parametrization_class():
    """The parametrization class (built on first use so importing shims stays cheap)."""
    global _PARAM_CLASS
    if _PARAM_CLASS is None:
        _PARAM_CLASS = _make_parametrization_class()
    return _PARAM_CLASS


# --------------------------------------------------------------------------------------------------------------
# structure detection


def _unwrap(module):
    """The module that really holds the tensors (peft wrappers expose it through get_base_layer)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def quantized_parametrization(module, name: str):
    """Our parametrization of ``module.<name>`` or None when that tensor is not 4-bit quantized by the shim."""
    _, P = _torch_nn()
    if not P.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, _Packed4bitBase):
            return p
    return None


def quantized_tensor_names(module) -> tuple[str, ...]:
    """Names of every tensor of ``module`` itself stored 4-bit by the shims (expert weights, a router's weight)."""
    names = getattr(module, "parametrizations", None) or {}
    return tuple(n for n in names if quantized_parametrization(module, n) is not None)


def _raw_tensor(module, name: str):
    """The stored tensor under ``name`` without evaluating a parametrization (None if absent)."""
    _, P = _torch_nn()
    if P.is_parametrized(module, name):
        return module.parametrizations[name].original
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t


def expert_weight_names(module) -> tuple[str, ...]:
    """Names of the fused expert weights of ``module`` ((), if it is not an experts module).

    An experts module, by structure: it holds a tensor ``down_proj`` and a tensor ``gate_up_proj`` or ``up_proj``
    (tensors, not submodules: per-expert nn.Linear experts of transformers 4.x do not qualify). Raises
    ExpertQuantError when such tensors exist but do not have the expected 3D layout, or look packed without state.
    """
    torch, _ = _torch_nn()
    present = [n for n in EXPERT_WEIGHT_NAMES if isinstance(_raw_tensor(module, n), torch.Tensor)]
    if "down_proj" not in present or len(present) < 2:
        return ()
    for name in present:
        param = quantized_parametrization(module, name)
        if param is not None:
            shape = param.logical_shape
        else:
            raw = _raw_tensor(module, name)
            if not (raw.is_floating_point() or raw.device.type == "meta"):
                raise ExpertQuantError(
                    f"{type(module).__name__}.{name}: holds {raw.dtype} data of shape {tuple(raw.shape)} but no "
                    "4-bit quantization state; expected a float 3D tensor or a shim-quantized one"
                )
            shape = tuple(raw.shape)
        if len(shape) != 3:
            raise ExpertQuantError(
                f"{type(module).__name__}.{name}: shape {shape} is not a fused expert layout; expected 3D "
                "(num_experts, out, in) or, transposed, (num_experts, in, out)"
            )
    return tuple(present)


def iter_expert_modules(model) -> Iterator[tuple[str, object]]:
    """(name, module) for every fused-experts module of ``model`` (peft wrappers see through to the base)."""
    for name, module in model.named_modules():
        if expert_weight_names(module):
            yield name, module


def is_quantized_experts(module) -> bool:
    """True when ``module`` (or the experts module a peft wrapper holds) has shim-quantized 4-bit expert weights."""
    base = _unwrap(module)
    return any(quantized_parametrization(base, n) is not None for n in EXPERT_WEIGHT_NAMES)


# --------------------------------------------------------------------------------------------------------------
# quantize / dequantize


# Elements per quantization chunk: bitsandbytes' CPU kernel makes ~20 bytes of temporaries per element (fp32 copy,
# scaled values, int32 codes); 2**22 elements keeps that near 80 MB whatever the tensor size.
CHUNK_ELEMENTS = 1 << 22


def _nest_absmax(absmax, blocksize: int, quant_type: str, shape, dtype):
    """Double quantization of the concatenated per-block absmax, exactly as bitsandbytes' quantize_4bit does it.

    The nested statistics are taken over ALL blocks of the tensor (mean offset, then 256-blockwise 8-bit), so they
    are computed once, after every chunk is in; the result equals quantize_4bit(..., compress_statistics=True)
    bit for bit (tested against it).
    """
    import bitsandbytes.functional as F

    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    return F.QuantState(absmax=qabsmax, shape=shape, dtype=dtype, blocksize=blocksize,
                        code=F.get_4bit_type(quant_type, device=absmax.device), quant_type=quant_type,
                        offset=offset, state2=state2)


class _ExpertPacker:
    """Fills the packed bytes and absmax of an (E, d1, d2) tensor from consecutive expert chunks.

    Each chunk is quantized on its own (no nested statistics yet); its bytes and absmax land at the chunk's
    offset, which is exactly where the whole-tensor call would put them when an expert is whole 4-bit blocks.
    """

    def __init__(self, shape, compute_dtype, blocksize, quant_type, quant_storage, compress_statistics):
        self.shape, self.compute_dtype, self.blocksize = shape, compute_dtype, blocksize
        self.quant_type, self.quant_storage, self.nested = quant_type, quant_storage, compress_statistics
        self.packed = self.absmax = None

    def add(self, start: int, chunk) -> None:
        import bitsandbytes.functional as F

        stop = start + chunk.shape[0]
        part_packed, part_state = F.quantize_4bit(
            chunk.to(self.compute_dtype).contiguous(), blocksize=self.blocksize, compress_statistics=False,
            quant_type=self.quant_type, quant_storage=self.quant_storage)
        rows, blocks = part_packed.shape[0] // chunk.shape[0], part_state.absmax.numel() // chunk.shape[0]
        experts = self.shape[0]
        if self.packed is None:
            self.packed = part_packed.new_empty((rows * experts, *part_packed.shape[1:]))
            self.absmax = part_state.absmax.new_empty((blocks * experts,))
        self.packed[rows * start: rows * stop] = part_packed
        self.absmax[blocks * start: blocks * stop] = part_state.absmax

    def finish(self):
        import bitsandbytes.functional as F

        packed, absmax, shape = self.packed, self.absmax, self.shape
        self.packed = self.absmax = None
        if self.nested:
            return packed, _nest_absmax(absmax, self.blocksize, self.quant_type, shape, self.compute_dtype)
        return packed, F.QuantState(absmax=absmax, shape=shape, dtype=self.compute_dtype, blocksize=self.blocksize,
                                    code=F.get_4bit_type(self.quant_type, device=absmax.device),
                                    quant_type=self.quant_type)


def effective_blocksize(blocksize=None) -> int:
    """The blocksize bitsandbytes uses for ``blocksize`` (None -> its default, asked from bitsandbytes itself)."""
    import bitsandbytes.functional as F
    import torch

    return F.quantize_4bit(torch.zeros(4096), blocksize=blocksize)[1].blocksize


def experts_split_into_blocks(expert_shape, blocksize: int, quant_storage) -> bool:
    """True when one expert (d1, d2) is whole 4-bit blocks and whole storage elements: chunking is then exact."""
    per_expert = math.prod(expert_shape)
    return per_expert > 0 and per_expert % blocksize == 0 and (per_expert // 2) % quant_storage.itemsize == 0


def experts_per_chunk(expert_shape, chunk_elements: int | None = None) -> int:
    per_expert = math.prod(expert_shape)
    return max(1, (chunk_elements or CHUNK_ELEMENTS) // max(per_expert, 1))


def quantize_experts_chunked(tensor, compute_dtype, blocksize=None, compress_statistics=False, quant_type="nf4",
                             quant_storage=None, chunk_elements: int | None = None):
    """bitsandbytes ``quantize_4bit`` of a 3D (E, d1, d2) tensor, a few experts at a time.

    Blockwise quantization runs over the row-major flattened tensor; when d1*d2 is a multiple of the blocksize no
    block straddles two experts, so quantizing expert slices and concatenating packed bytes and absmax gives the
    very bytes and absmax of the whole-tensor call, while the float temporaries (the cast to ``compute_dtype`` and
    the kernel's own) exist for one chunk only. Otherwise it falls back to one whole-tensor call.
    Returns (packed, QuantState) like ``quantize_4bit``.
    """
    import bitsandbytes.functional as F
    import torch

    quant_storage = quant_storage or torch.uint8
    experts, expert_shape = tensor.shape[0], tuple(tensor.shape[1:])
    step = experts_per_chunk(expert_shape, chunk_elements)
    block = effective_blocksize(blocksize)
    if experts <= step or not experts_split_into_blocks(expert_shape, block, quant_storage):
        if experts > step:
            log.debug("expert slice %s is not whole %d-blocks: quantizing %s at once",
                      expert_shape, block, tuple(tensor.shape))
        return F.quantize_4bit(tensor.to(compute_dtype).contiguous(), blocksize=blocksize,
                               compress_statistics=compress_statistics, quant_type=quant_type,
                               quant_storage=quant_storage)
    packer = _ExpertPacker(tensor.shape, compute_dtype, block, quant_type, quant_storage, compress_statistics)
    for start in range(0, experts, step):
        packer.add(start, tensor[start: start + step])
    return packer.finish()


def quantize_expert_param(module, name: str, settings: QuantSettings, owner: str = "") -> None:
    """Replace the float 3D tensor ``module.<name>`` by packed 4-bit storage + a dequantizing parametrization."""
    torch, P = _torch_nn()
    owner = owner or type(module).__name__
    label = f"{owner}.{name}"
    if quantized_parametrization(module, name) is not None:
        return
    if P.is_parametrized(module, name):
        raise ExpertQuantError(f"{label}: already parametrized by something else; expected a plain 3D parameter")
    tensor = module._parameters.get(name)
    if tensor is None or not tensor.is_floating_point() or tensor.dim() != 3:
        got = None if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
        raise ExpertQuantError(f"{label}: expected a float 3D nn.Parameter, got {got}")
    compute_dtype = settings.compute_dtype or tensor.dtype
    packed, quant_state = quantize_experts_chunked(
        tensor.detach(), compute_dtype,
        blocksize=settings.blocksize,
        compress_statistics=settings.compress_statistics,
        quant_type=settings.quant_type,
        quant_storage=settings.quant_storage or torch.uint8,
    )
    install_packed_param(module, name, packed, quant_state, owner=owner)
    log.debug("quantized %s %s -> 4-bit %s", label, tuple(quant_state.shape), settings.quant_type)


def install_packed_param(module, name: str, packed, quant_state, owner: str = "") -> None:
    """Store packed 4-bit data + its QuantState as ``module.<name>`` (just quantized, or read from a saved checkpoint).

    Replaces the float tensor or (usually meta) placeholder without materialising it in float: the logical shape
    and dtype come from ``quant_state``.
    """
    from .forward import install_forward_hooks

    torch, P = _torch_nn()
    owner = owner or type(module).__name__
    label = f"{owner}.{name}"
    if quant_state is None:
        raise ExpertQuantError(f"{label}: packed 4-bit data without quantization state (QuantState)")
    if P.is_parametrized(module, name):
        raise ExpertQuantError(f"{label}: already parametrized; expected the float placeholder of a fresh model")
    dims = 3 if name in EXPERT_WEIGHT_NAMES else 2  # fused experts, or a router's (num_experts, hidden) weight
    if len(quant_state.shape) != dims:
        raise ExpertQuantError(f"{label}: quantization state has shape {tuple(quant_state.shape)}; expected a "
                               f"{dims}D {'experts' if dims == 3 else 'router'} tensor")
    settings = QuantSettings(quant_state.quant_type, bool(quant_state.nested), quant_state.dtype, packed.dtype,
                             quant_state.blocksize)
    module._parameters.pop(name, None)
    packed_param = torch.nn.Parameter(packed.detach(), requires_grad=False)
    packed_param._is_hf_initialized = True  # transformers must never re-initialise packed bytes
    module.register_parameter(name, packed_param)
    P.register_parametrization(module, name, parametrization_class()(quant_state, settings, label), unsafe=True)
    install_forward_hooks(module)  # cast in / cast out as Linear4bit does, for experts and routers alike


def requantize_param(module, name: str, value) -> None:
    """Store ``value`` (logical shape) into an already quantized tensor with the same settings (used by merge)."""
    param = quantized_parametrization(module, name)
    if param is None:
        raise ExpertQuantError(f"{type(module).__name__}.{name} is not a shim-quantized expert tensor")
    if tuple(value.shape) != param.logical_shape:
        raise ExpertQuantError(f"{param.owner}: new value has shape {tuple(value.shape)}, expected {param.logical_shape}")
    s = param.settings
    original = module.parametrizations[name].original
    packed, quant_state = quantize_experts_chunked(
        value.detach().to(device=original.device), s.compute_dtype,
        blocksize=s.blocksize, compress_statistics=s.compress_statistics,
        quant_type=s.quant_type, quant_storage=s.quant_storage,
    )
    original.data = packed
    param.quant_state = quant_state


def dequantize_param(module, name: str):
    """The base weight ``module.<name>`` dequantized: logical shape, compute dtype, without any LoRA delta.

    ``module`` may be the experts module or a peft wrapper around it. Raises ExpertQuantError otherwise.
    """
    base = _unwrap(module)
    param = quantized_parametrization(base, name)
    if param is None:
        raise ExpertQuantError(
            f"{type(base).__name__}.{name} is not a shim-quantized 4-bit expert tensor "
            f"(quantized names here: {[n for n in EXPERT_WEIGHT_NAMES if quantized_parametrization(base, n)]})"
        )
    return param(base.parametrizations[name].original)


def _quant_state_bytes(qs) -> int:
    total = 0
    for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
        if t is not None and hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def expert_storage(model) -> dict:
    """Count fused expert weights: how many, how many 4-bit, their stored bytes, and what bf16 would take."""
    counts = dict(expert_tensors=0, quantized=0, bytes=0, bf16_bytes=0)
    for _, module in iter_expert_modules(model):
        for name in expert_weight_names(module):
            counts["expert_tensors"] += 1
            param = quantized_parametrization(module, name)
            raw = _raw_tensor(module, name)
            if param is not None:
                counts["quantized"] += 1
                shape = param.logical_shape
                counts["bytes"] += raw.numel() * raw.element_size() + _quant_state_bytes(param.quant_state)
            else:
                shape = tuple(raw.shape)
                counts["bytes"] += raw.numel() * raw.element_size()
            numel = 1
            for d in shape:
                numel *= d
            counts["bf16_bytes"] += 2 * numel
    return counts


# --------------------------------------------------------------------------------------------------------------
# which modules to convert


def _skipped(module_name: str, patterns) -> bool:
    """Same rules as transformers' modules_to_not_convert: prefix up to a module boundary, regex, or suffix."""
    for key in patterns or ():
        if module_name == key or module_name.startswith(key + ".") or module_name.endswith("." + key):
            return True
        try:
            if re.fullmatch(rf"(?:{key})(?:\..*)?", module_name):
                return True
        except re.error:
            continue
    return False


def _is_bnb_4bit(hf_quantizer) -> bool:
    cfg = getattr(hf_quantizer, "quantization_config", None)
    method = getattr(cfg, "quant_method", "")
    return bool(getattr(cfg, "load_in_4bit", False)) and getattr(method, "value", method) == "bitsandbytes"


def _skip_patterns(hf_quantizer) -> list[str]:
    patterns = getattr(hf_quantizer, "modules_to_not_convert", None)
    if patterns is None:
        patterns = getattr(hf_quantizer.quantization_config, "llm_int8_skip_modules", None)
    return list(patterns or [])


def claimed_expert_tensor(hf_quantizer, model, tensor_path: str):
    """(module path, module, tensor name) when ``tensor_path`` names a fused expert weight that this bnb 4-bit
    quantizer should store in 4 bits (not skipped by modules_to_not_convert); None otherwise."""
    if hf_quantizer is None or model is None or not _is_bnb_4bit(hf_quantizer):
        return None
    module_path, _, name = tensor_path.rpartition(".")
    if name not in EXPERT_WEIGHT_NAMES:
        return None
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    if name not in expert_weight_names(module) or _skipped(module_path, _skip_patterns(hf_quantizer)):
        return None
    return module_path, module, name


def quantize_experts_module(module, module_name: str, settings: QuantSettings) -> int:
    """Quantize every float expert weight of one experts module; returns how many were quantized."""
    done = 0
    for name in expert_weight_names(module):
        if quantized_parametrization(module, name) is not None:
            continue
        raw = _raw_tensor(module, name)
        if raw.device.type == "meta":
            continue
        quantize_expert_param(module, name, settings, owner=module_name or type(module).__name__)
        done += 1
    return done


def quantize_model_experts(model, quantization_config, skip_modules=()) -> int:
    """Quantize the fused experts of an already loaded model (biases stay float). Returns tensors quantized."""
    settings = QuantSettings.from_bnb_config(quantization_config)
    done = 0
    for name, module in list(iter_expert_modules(model)):
        if _skipped(name, skip_modules):
            continue
        done += quantize_experts_module(module, name, settings)
    return done


# --------------------------------------------------------------------------------------------------------------
# the patch


def _has_fused_experts() -> bool:
    # Feature detection: transformers >= 5 declares its fused experts through integrations.moe.
    try:
        return importlib.util.find_spec("transformers.integrations.moe") is not None
    except (ImportError, ValueError):
        return False


_LOADER = Target("transformers.core_model_loading", "set_param_for_module",
                 ("model", "target_name", "param_value", "hf_quantizer"))
_CONVERTER = Target("transformers.core_model_loading", "WeightConverter.convert",
                    ("layer_name", "model", "config", "hf_quantizer", "loading_info"))
_AFTER_LOAD = Target("transformers.quantizers.quantizer_bnb_4bit",
                     "Bnb4BitHfQuantizer._process_model_after_weight_loading", ("model",))
# Before reading any weight, from_pretrained reserves GPU memory for the whole model (caching_allocator_warmup), sized
# by the quantizer's param_element_size: 0.5 byte for Linear4bit weights, the float size for everything else. Fused
# experts (most of an MoE) were counted in bf16, so that one reservation alone was 2.3x the 4-bit model.
# After loading, transformers initialises every module not flagged as loaded; an experts module's _init_weights reads
# module.gate_up_proj, which for 4-bit experts dequantizes the whole tensor (a throwaway float copy: on an H200 the
# largest transient of the load, 0.75 GiB for one Qwen3-30B-A3B gate_up).
_INIT = Target("transformers.modeling_utils", "PreTrainedModel._initialize_weights", ("module",))
_WARMUP_SIZE = Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.param_element_size",
                      ("model", "param_name", "param"))


def _needed() -> str | None:
    if not _has_fused_experts():
        return ("transformers loads through its 4.x loader here: fused experts (gpt_oss) are handled by "
                "quantize_fused_experts_v4; per-expert nn.Linear experts are quantized natively (Linear4bit)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'moe-shims[quant]')"
    return None


def _settings_for(hf_quantizer) -> QuantSettings:
    settings = getattr(hf_quantizer, "_shims_settings", None)
    if settings is None:
        settings = QuantSettings.from_bnb_config(hf_quantizer.quantization_config)
        hf_quantizer._shims_settings = settings
    return settings


def _stackable_ops(operations) -> bool:
    """True for the converter chains that build expert i of the fused tensor from the per-expert tensors of expert i
    only: stack the per-expert list along dim 0, then optionally concatenate the stacks along a later dim (gate and
    up -> gate_up). Running them on a slice of experts then gives exactly that slice of the fused tensor."""
    import transformers.core_model_loading as cml

    merge, concat = getattr(cml, "MergeModulelist", None), getattr(cml, "Concatenate", None)
    if merge is None or concat is None or not operations or type(operations[0]) is not merge:
        return False
    if getattr(operations[0], "dim", None) != 0:
        return False
    return all(type(op) is concat and isinstance(getattr(op, "dim", None), int) and op.dim >= 1
               and getattr(op, "num_shards_attribute", None) is None for op in operations[1:])


def _streamable_target(converter, layer_name, model, hf_quantizer):
    """(module, name, settings) when this converter builds one fused expert tensor we can quantize per expert chunk
    as the per-expert checkpoint tensors are read; None to let transformers fuse it as usual."""
    import torch

    if getattr(hf_quantizer, "pre_quantized", False):
        return None
    if getattr(converter, "quantization_operation", None) is not None or "*" in layer_name:
        return None
    if len(getattr(converter, "target_patterns", ())) != 1 or not _stackable_ops(getattr(converter, "operations", ())):
        return None
    claimed = claimed_expert_tensor(hf_quantizer, model, layer_name)
    if claimed is None:
        return None
    _, module, name = claimed
    placeholder = module._parameters.get(name)
    if placeholder is None or not placeholder.is_floating_point():
        return None
    settings = _settings_for(hf_quantizer)
    collected = getattr(converter, "collected_tensors", None)
    experts = placeholder.shape[0]
    if not isinstance(collected, dict) or not collected or any(len(v) != experts for v in collected.values()):
        return None
    block = effective_blocksize(settings.blocksize)
    if not experts_split_into_blocks(tuple(placeholder.shape[1:]), block, settings.quant_storage or torch.uint8):
        return None
    return module, name, settings


def _realize(item):
    """One collected checkpoint tensor: a Future (async load), a callable (sync load) or already a tensor."""
    from concurrent.futures import Future

    if isinstance(item, Future):
        item = item.result()
    elif callable(item):
        item = item()
    if item is None:
        raise ExpertQuantError("a per-expert checkpoint tensor did not load (None); expected one tensor per expert")
    return item


def stream_quantize_converter(converter, layer_name, module, name, settings, model=None, config=None,
                             loading_info=None) -> None:
    """Build the fused expert tensor ``layer_name`` a chunk of experts at a time with the converter's own ops and
    quantize each chunk right away, so neither all per-expert float tensors nor the fused float tensor ever exist
    at once. The packed result is bit-identical to quantizing the fused tensor (experts are whole 4-bit blocks)."""
    import torch

    placeholder = module._parameters[name]
    shape = placeholder.shape
    compute_dtype = settings.compute_dtype or placeholder.dtype
    packer = _ExpertPacker(shape, compute_dtype, effective_blocksize(settings.blocksize), settings.quant_type,
                           settings.quant_storage or torch.uint8, settings.compress_statistics)
    collected = {k: converter.collected_tensors.pop(k) for k in list(converter.collected_tensors)}
    missing = getattr(loading_info, "missing_keys", None)
    step = experts_per_chunk(tuple(shape[1:]))
    for start in range(0, shape[0], step):
        chunk = {k: [_realize(item) for item in v[start: start + step]] for k, v in collected.items()}
        for k, v in collected.items():
            v[start: start + step] = [None] * len(v[start: start + step])  # drop the loaders as we go
        for op in converter.operations:
            chunk = op.convert(chunk, source_patterns=converter.source_patterns,
                               target_patterns=converter.target_patterns, full_layer_name=layer_name, model=model,
                               config=config, missing_keys=missing)
        (fused_chunk,) = chunk.values()
        if tuple(fused_chunk.shape[1:]) != tuple(shape[1:]):
            raise ExpertQuantError(f"{layer_name}: converter built experts of shape {tuple(fused_chunk.shape[1:])}, "
                                   f"expected {tuple(shape[1:])}")
        packer.add(start, fused_chunk)
        del chunk, fused_chunk
    packed, quant_state = packer.finish()
    module_path = layer_name.rpartition(".")[0]
    install_packed_param(module, name, packed, quant_state, owner=module_path)
    if missing is not None:
        missing.discard(layer_name)
    log.debug("quantized %s %s -> 4-bit %s (streamed per expert chunk)", layer_name, tuple(shape),
              settings.quant_type)


def _loaded_from_checkpoint(module) -> bool:
    """True when every tensor of ``module`` itself, 4-bit expert data included, carries transformers' "loaded" flag."""
    tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
    tensors += [module.parametrizations[n].original for n in quantized_tensor_names(module)]
    return all(getattr(t, "_is_hf_initialized", False) for t in tensors)


def skip_init_of_loaded_experts() -> callable:
    """Wrap PreTrainedModel._initialize_weights so a fully loaded module holding shim 4-bit tensors (experts, a
    router) is not initialised again (which would only dequantize it into a discarded copy). Returns the undo."""
    from transformers.modeling_utils import PreTrainedModel

    original_init = PreTrainedModel._initialize_weights

    @wraps(original_init)
    def _initialize_weights(self, module, *args, **kwargs):
        if quantized_tensor_names(module) and _loaded_from_checkpoint(module):
            module._is_hf_initialized = True
            return None
        return original_init(self, module, *args, **kwargs)

    return swap_attr(PreTrainedModel, "_initialize_weights", _initialize_weights)


def loader_hooks(on_set, sweep, counts_as_4bit) -> list:
    """Wrap transformers 5.x's bnb 4-bit load at the three points where a kind of tensor the shims store in 4 bits
    (fused experts, routers) must be seen; returns the undos.

    ``on_set(model, target_name, param_value, hf_quantizer)``: after ``set_param_for_module`` stored one tensor.
    ``sweep(quantizer, model) -> int``: after every weight is loaded, before upstream's own post-processing.
    ``counts_as_4bit(quantizer, model, param_name)``: the GPU warm-up sizes that tensor at 0.5 byte per element.
    """
    import transformers.core_model_loading as cml
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original_set = cml.set_param_for_module
    original_after = Bnb4BitHfQuantizer._process_model_after_weight_loading
    original_size = Bnb4BitHfQuantizer.param_element_size if _WARMUP_SIZE.drift() == "ok" else None

    @wraps(original_set)
    def set_param_for_module(model, target_name, param_value, *args, **kwargs):
        result = original_set(model, target_name, param_value, *args, **kwargs)
        on_set(model, target_name, param_value, kwargs.get("hf_quantizer", args[-1] if args else None))
        return result

    @wraps(original_after)
    def process_model_after_weight_loading(self, model, **kwargs):
        n = sweep(self, model)
        if n:
            log.info("quantized %d tensors after loading (%s)", n, sweep.__name__)
        return original_after(self, model, **kwargs)

    def param_element_size(self, model, param_name, param, *args, **kwargs):
        if counts_as_4bit(self, model, param_name):
            return 0.5  # 4 bits, as upstream counts a Linear4bit weight (its absmax is left out there too)
        return original_size(self, model, param_name, param, *args, **kwargs)

    undos = [
        swap_attr(cml, "set_param_for_module", set_param_for_module),
        swap_attr(Bnb4BitHfQuantizer, "_process_model_after_weight_loading", process_model_after_weight_loading),
    ]
    if original_size is not None:
        undos.append(swap_attr(Bnb4BitHfQuantizer, "param_element_size", wraps(original_size)(param_element_size)))
    return undos


def _quantize_claimed_expert(model, target_name, param_value, hf_quantizer) -> None:
    if getattr(hf_quantizer, "pre_quantized", False) and not param_value.is_floating_point():
        return  # packed data of a saved 4-bit checkpoint: handled by the reload path
    claimed = claimed_expert_tensor(hf_quantizer, model, target_name)
    if claimed is None:
        return
    module_path, module, param_name = claimed
    raw = _raw_tensor(module, param_name)
    # If upstream ever quantizes experts itself the tensor arrives non-float: then we leave it alone.
    if raw is not None and raw.is_floating_point() and raw.device.type != "meta":
        quantize_expert_param(module, param_name, _settings_for(hf_quantizer), owner=module_path)


def missing_experts_sweep(hf_quantizer, model) -> int:
    """Expert tensors that did not pass through set_param_for_module (missing from the checkpoint -> initialised)."""
    return quantize_model_experts(model, hf_quantizer.quantization_config, _skip_patterns(hf_quantizer))


def _install() -> callable:
    import transformers.core_model_loading as cml

    original_convert = cml.WeightConverter.convert

    @wraps(original_convert)
    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None, **kwargs):
        target = None if kwargs else _streamable_target(self, layer_name, model, hf_quantizer)
        if target is None:
            return original_convert(self, layer_name, model=model, config=config, hf_quantizer=hf_quantizer,
                                    loading_info=loading_info, **kwargs)
        stream_quantize_converter(self, layer_name, *target, model=model, config=config, loading_info=loading_info)
        return {}  # already stored in the module, packed

    undos = loader_hooks(_quantize_claimed_expert, missing_experts_sweep,
                         lambda quantizer, model, name: claimed_expert_tensor(quantizer, model, name) is not None)
    if _CONVERTER.drift() == "ok":
        undos.append(swap_attr(cml.WeightConverter, "convert", convert))
    if _INIT.drift() == "ok":
        undos.append(skip_init_of_loaded_experts())
    return chain_undo(undos)


_TARGETS = (_LOADER, _AFTER_LOAD)

PATCHES: tuple = (
    Patch(
        name="quantize_fused_experts",
        summary="BitsAndBytesConfig(load_in_4bit) also stores fused 3D MoE expert weights in 4-bit "
                "(packed + QuantState, dequantized per forward)",
        # On transformers 4.x these symbols do not exist and the patch is not needed: drift-check them only
        # where fused experts exist, so 4.57 reports "not needed" rather than drift.
        targets=_TARGETS if _has_fused_experts() else (),
        # The converter, element-size and init wraps only lower the load peak (per-expert streaming, a 4-bit sized
        # GPU warm-up, no throwaway dequantization); without them loading still quantizes.
        optional_targets=((_CONVERTER, _WARMUP_SIZE, _INIT) if _has_fused_experts()
                          else _TARGETS + (_CONVERTER, _WARMUP_SIZE, _INIT)),
        needed=_needed,
        install=_install,
    ),
)
