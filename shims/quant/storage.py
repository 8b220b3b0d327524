"""The 4-bit storage primitive: a tensor stored with bitsandbytes' own storage (packed 4-bit data + ``QuantState``)
that reads back as the logical float tensor.

Each stored tensor is the ``original`` of a ``torch.nn.utils.parametrize`` parametrization
(:func:`parametrization_class`). Reading ``module.gate_up_proj`` (or a router's ``module.weight``) dequantizes on
the fly, so every experts implementation (grouped_mm, batched_mm, eager) and every router runs unchanged, and peft
sees the logical shape and the compute dtype. While the module runs its forward the dequantized tensor is cached
and dropped when that forward returns (:mod:`shims.quant.forward`): there is no persistent float copy.

Also here: finding expert stacks by STRUCTURE (3D tensors sharing their leading expert dimension, whatever their
names or class), quantizing them a few experts at a time (bit-identical to bitsandbytes' whole-tensor call),
re-quantizing after a merge, and the byte accounting. The loaders that call this: :mod:`shims.quant.loader_v5`
(transformers 5.x), :mod:`shims.quant.quant_legacy` (4.x), :mod:`shims.quant.quant_router`, :mod:`shims.quant.checkpoint`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterator

from .bnb_config import QuantSettings, is_bnb_4bit, is_skipped, skip_patterns
from .forward import install_forward_hooks

log = logging.getLogger("shims")

# transformers' fused expert tensor names (the order it registers them). Experts are found by structure whatever the
# names (expert_weight_names); these are the ones whose shape is also checked, and the 4.x / fused checkpoint formats.
EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")


class ExpertQuantError(RuntimeError):
    """An expert tensor the shim cannot handle: wrong shape, or quantized data without its quantization state."""


def _torch_nn():
    import torch
    import torch.nn.utils.parametrize as P

    return torch, P


class _Packed4bitMarker:
    """Marker so that isinstance checks work without importing torch at module import."""


# bitsandbytes' 4-bit kernels take the element count as a signed 32-bit int, and their launch arithmetic adds a tile
# to it (an H200 refused a part of 2**31 - 64 elements: "invalid argument", ops.cu line 93), so larger stacks
# (DeepSeek-V3's gate_up: 256 x 4096 x 7168 = 7.5e9 elements) are decoded in parts of at most 2**30.
KERNEL_MAX_ELEMENTS = 2**30


def dequantize_flat(packed, quant_state):
    """bitsandbytes' ``dequantize_4bit`` over the flat tensor, reshaped to the logical shape.

    bitsandbytes 0.50.2 on CPU decodes a 3D tensor wrongly when its last dimension is not a multiple of the 64-element
    block (measured: (4, 64, 48) off by up to 1.07 x absmax, against nf4's 0.152 bound), while the flat decode of the
    same bytes and absmax is right. The blocks run over the flattened tensor either way, so the flat call is the
    tensor's true value on every device. Tensors over ``KERNEL_MAX_ELEMENTS`` are decoded in whole-block parts.
    """
    import copy

    import bitsandbytes.functional as F

    numel = math.prod(quant_state.shape)
    if numel > KERNEL_MAX_ELEMENTS:
        return _dequantize_in_parts(packed, quant_state, numel).reshape(quant_state.shape)
    flat = copy.copy(quant_state)  # shares absmax and the nested statistics; only the shape differs
    flat.shape = type(quant_state.shape)([numel])
    return F.dequantize_4bit(packed, flat).reshape(quant_state.shape)


def _dequantize_in_parts(packed, quant_state, numel: int):
    """The flat decode, ``KERNEL_MAX_ELEMENTS`` at a time: each part is whole blocks with their absmax (nested
    statistics decoded first, as bitsandbytes does inside ``dequantize_4bit``), so every value is the same."""
    import bitsandbytes.functional as F
    import torch

    qs, block = quant_state, quant_state.blocksize
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    absmax = absmax.float()
    values_per_item = 2 * packed.element_size()  # two 4-bit values per byte of the storage dtype
    part = (KERNEL_MAX_ELEMENTS // math.lcm(block, values_per_item)) * math.lcm(block, values_per_item)
    flat_packed, out = packed.reshape(-1), torch.empty(numel, dtype=qs.dtype, device=packed.device)
    for start in range(0, numel, part):
        stop = min(numel, start + part)
        state = F.QuantState(absmax=absmax[start // block: -(-stop // block)], shape=torch.Size([stop - start]),
                             dtype=qs.dtype, blocksize=block, code=qs.code, quant_type=qs.quant_type)
        chunk = flat_packed[start // values_per_item: -(-stop // values_per_item)]
        out[start:stop] = F.dequantize_4bit(chunk.reshape(-1, 1), state)
    return out


def _make_parametrization_class():
    torch, _ = _torch_nn()

    class Packed4bitExperts(torch.nn.Module, _Packed4bitMarker):
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
                return dequantize_flat(packed, self.quant_state)

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


def base_module(module):
    """The module that really holds the tensors (peft wrappers expose it through get_base_layer)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def is_4bit_parametrization(parametrization) -> bool:
    """True for the shims' dequantizing parametrization (one entry of a ``module.parametrizations[name]`` list)."""
    return isinstance(parametrization, _Packed4bitMarker)


def quantized_parametrization(module, name: str):
    """Our parametrization of ``module.<name>`` or None when that tensor is not 4-bit quantized by the shim."""
    _, P = _torch_nn()
    if not P.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if is_4bit_parametrization(p):
            return p
    return None


def quantized_tensor_names(module) -> tuple[str, ...]:
    """Names of every tensor of ``module`` itself stored 4-bit by the shims (expert weights, a router's weight)."""
    names = getattr(module, "parametrizations", None) or {}
    return tuple(n for n in names if quantized_parametrization(module, n) is not None)


def raw_tensor(module, name: str):
    """The stored tensor under ``name`` without evaluating a parametrization (None if absent)."""
    _, P = _torch_nn()
    if P.is_parametrized(module, name):
        return module.parametrizations[name].original
    t = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    return t


# Set on a module before the shims move the first of its tensors under ``parametrizations``: the order in which the
# module registered its tensors. peft nests its ParamWrappers in that order (gate_up inner, down outer), so adapter
# keys of a 4-bit model equal those of the float model only if the shims keep it.
_ORDER_ATTR = "_shims_tensor_order"


def _registration_order(module) -> list[str]:
    recorded = module.__dict__.get(_ORDER_ATTR)
    present = [n for n, p in module._parameters.items() if p is not None]
    present += list(getattr(module, "parametrizations", None) or {})
    if recorded is None:
        return present
    return [n for n in recorded if n in present] + [n for n in present if n not in recorded]


def _stack_shape(module, name: str):
    """The logical shape of ``module.<name>`` when it is a float (or meta, or shim 4-bit) tensor, else None."""
    param = quantized_parametrization(module, name)
    if param is not None:
        return param.logical_shape
    raw = raw_tensor(module, name)
    if raw is None:
        return None
    if not (raw.is_floating_point() or raw.device.type == "meta"):
        if name in EXPERT_WEIGHT_NAMES:
            raise ExpertQuantError(
                f"{type(module).__name__}.{name}: holds {raw.dtype} data of shape {tuple(raw.shape)} but no "
                "4-bit quantization state; expected a float 3D tensor or a shim-quantized one"
            )
        return None
    return tuple(raw.shape)


def candidate_stacks(module) -> tuple[str, ...]:
    """Direct 3D tensors of ``module`` in registration order: (experts, out, in)-shaped stacks, whatever their name.
    Convolution kernels (also 3D) are not stacks."""
    torch, _ = _torch_nn()
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return ()
    return tuple(n for n in _registration_order(module) if len(_stack_shape(module, n) or ()) == 3)


def _single_stack_experts(module, siblings) -> bool:
    """One 3D stack in a module is an expert group's projection when the shims already stored it so, or when a
    sibling module holds a single stack with as many experts (jetmoe: ``input_linear.weight`` (E, 2I, H) next to
    ``output_linear.weight`` (E, H, I)). A lone 3D tensor (e.g. a (heads, slots, dim) query bank) is not."""
    (name,) = candidate_stacks(module)
    if quantized_parametrization(module, name) is not None:
        return True
    experts = _stack_shape(module, name)[0]
    for sibling in siblings or ():
        sibling = base_module(sibling)
        if sibling is module:
            continue
        stacks = candidate_stacks(sibling)
        if len(stacks) == 1 and _stack_shape(sibling, stacks[0])[0] == experts:
            return True
    return False


# Config attributes that hold a model's expert count (num_local_experts, n_routed_experts, moe_num_experts ...).
_EXPERT_COUNT = re.compile(r"^(n|num|moe_num)_(local_|routed_)?experts?$")


def config_expert_counts(config) -> frozenset:
    """Every expert count (>= 2) a model config (and its sub-configs, e.g. dbrx ``ffn_config``) declares."""
    counts, seen, todo = set(), set(), [config]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        values = item if isinstance(item, dict) else getattr(item, "__dict__", {})
        for key, value in values.items():
            if isinstance(value, int) and not isinstance(value, bool) and _EXPERT_COUNT.match(str(key)) and value >= 2:
                counts.add(value)
            elif isinstance(value, dict) or hasattr(value, "to_dict"):
                todo.append(value)
    return frozenset(counts)


def flat_stacks(module, expert_counts=()) -> tuple[str, ...]:
    """Expert stacks stored flattened to 2D (dbrx ``w1`` / ``v1`` / ``w2``, each (E * F, H)): two or more direct 2D
    tensors of one shape in a module that is no torch layer, whose row count is a multiple of an expert count the
    model config declares (``expert_counts``), or already stored 4-bit by the shims as such a group."""
    torch, _ = _torch_nn()
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return ()
    names = [n for n in _registration_order(module) if len(_stack_shape(module, n) or ()) == 2]
    if len(names) < 2 or len({_stack_shape(module, n) for n in names}) != 1:
        return ()
    if all(quantized_parametrization(module, n) is not None for n in names):
        return tuple(names)
    rows = _stack_shape(module, names[0])[0]
    return tuple(names) if any(rows % e == 0 and rows > e for e in expert_counts) else ()


def expert_weight_names(module, siblings=None, expert_counts=()) -> tuple[str, ...]:
    """Names of the expert weight stacks of ``module`` ((), if it is not an experts module), in registration order.

    By STRUCTURE, whatever the names: every direct 3D tensor of a module holding two or more of them with the same
    leading (expert) dimension (transformers' fused ``gate_up_proj``/``down_proj``, nemotron_h ``up_proj``, inkling's
    shared ``gate_proj``/``up_proj``/``down_proj``), or a module's single 3D stack next to a sibling module holding one
    with as many experts (jetmoe; ``siblings``: the other children of the module's parent). Stacks of different
    leading sizes are one group only when the smallest is an expert count the model config declares (longcat_flash
    allocates ``gate_up_proj`` for its routed + zero experts, ``down_proj`` for the routed ones; its forward reads the
    first ones of both). All of a module's stacks or none: a module is never partly an experts module. Without 3D
    tensors, 2D stacks flattened over the experts (dbrx, :func:`flat_stacks`; ``expert_counts`` from the model
    config). Per-expert nn.Linear experts (transformers 4.x) hold no 3D tensor and do not qualify. Raises
    ExpertQuantError when fused tensors named ``down_proj`` and ``gate_up_proj`` / ``up_proj`` exist but are not 3D,
    or look packed without a quantization state.
    """
    torch, _ = _torch_nn()
    known = [n for n in EXPERT_WEIGHT_NAMES if isinstance(raw_tensor(module, n), torch.Tensor)]
    if "down_proj" in known and len(known) >= 2:
        for name in known:
            shape = _stack_shape(module, name)
            if shape is not None and len(shape) != 3:
                raise ExpertQuantError(
                    f"{type(module).__name__}.{name}: shape {shape} is not a fused expert layout; expected 3D "
                    "(num_experts, out, in) or, transposed, (num_experts, in, out)"
                )
    stacks = candidate_stacks(module)
    if not stacks:
        return flat_stacks(module, expert_counts)
    leading = {_stack_shape(module, n)[0] for n in stacks}
    if len(leading) != 1 and min(leading) not in expert_counts:
        return ()  # 3D tensors of different leading sizes: not one expert group
    if len(stacks) == 1 and not _single_stack_experts(module, siblings):
        return ()
    return stacks


def _parent_children(model, path: str) -> list:
    """The modules next to ``path`` (the children of its parent), seen through peft wrappers."""
    parent_path = ".".join(p for p in path.split(".") if p != "base_layer").rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return []
    return [base_module(child) for _, child in parent.named_children()]


def iter_expert_stacks(model) -> Iterator[tuple[str, object, tuple[str, ...]]]:
    """(name, module, its expert stack names) for every experts module of ``model`` (peft wrappers see through)."""
    counts = config_expert_counts(getattr(model, "config", None))
    for name, module in model.named_modules():
        if not candidate_stacks(module) and not flat_stacks(module, counts):
            continue
        names = expert_weight_names(module, _parent_children(model, name), counts)
        if names:
            yield name, module, names


def iter_expert_modules(model) -> Iterator[tuple[str, object]]:
    """(name, module) for every experts module of ``model`` (peft wrappers see through to the base)."""
    for name, module, _ in iter_expert_stacks(model):
        yield name, module


def quantized_stack_names(module) -> tuple[str, ...]:
    """The expert stacks of ``module`` itself (3D, or flattened 2D) that the shims store 4-bit, in registration
    order (a router's 4-bit ``weight`` is not a stack)."""
    return tuple(n for n in candidate_stacks(module) + flat_stacks(module)
                 if quantized_parametrization(module, n) is not None)


def is_quantized_experts(module) -> bool:
    """True when ``module`` (or the experts module a peft wrapper holds) has shim-quantized 4-bit expert weights."""
    base = base_module(module)
    return any(quantized_parametrization(base, n) is not None for n in candidate_stacks(base) + flat_stacks(base))


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


class ExpertPacker:
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
    packer = ExpertPacker(tensor.shape, compute_dtype, block, quant_type, quant_storage, compress_statistics)
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
    dims = (3,) if name in EXPERT_WEIGHT_NAMES else (2, 3)  # transformers' fused names are always 3D stacks
    if tensor is None or not tensor.is_floating_point() or tensor.dim() not in dims:
        got = None if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
        raise ExpertQuantError(f"{label}: expected a float 3D (or flattened 2D) expert stack, got {got}")
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
    torch, P = _torch_nn()
    owner = owner or type(module).__name__
    label = f"{owner}.{name}"
    if quant_state is None:
        raise ExpertQuantError(f"{label}: packed 4-bit data without quantization state (QuantState)")
    if P.is_parametrized(module, name):
        raise ExpertQuantError(f"{label}: already parametrized; expected the float placeholder of a fresh model")
    placeholder = module._parameters.get(name)
    if placeholder is not None and tuple(placeholder.shape) != tuple(quant_state.shape):
        raise ExpertQuantError(f"{label}: quantization state has shape {tuple(quant_state.shape)}; the model's "
                               f"tensor has shape {tuple(placeholder.shape)}")
    if len(quant_state.shape) not in (2, 3):  # expert stacks (3D), routers and flattened stacks (2D)
        raise ExpertQuantError(f"{label}: quantization state has shape {tuple(quant_state.shape)}; expected a 2D "
                               "or 3D tensor")
    settings = QuantSettings(quant_state.quant_type, bool(quant_state.nested), quant_state.dtype, packed.dtype,
                             quant_state.blocksize)
    module.__dict__.setdefault(_ORDER_ATTR, tuple(_registration_order(module)))
    module._parameters.pop(name, None)
    packed_param = torch.nn.Parameter(packed.detach(), requires_grad=False)
    packed_param._is_hf_initialized = True  # transformers must never re-initialise packed bytes
    module.register_parameter(name, packed_param)
    P.register_parametrization(module, name, parametrization_class()(quant_state, settings, label), unsafe=True)
    install_forward_hooks(module, quant_state.dtype)  # cast in / cast out as Linear4bit does, experts and routers


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
    base = base_module(module)
    param = quantized_parametrization(base, name)
    if param is None:
        raise ExpertQuantError(
            f"{type(base).__name__}.{name} is not a shim-quantized 4-bit expert tensor "
            f"(quantized names here: {list(quantized_tensor_names(base))})"
        )
    return param(base.parametrizations[name].original)


def quant_state_bytes(qs) -> int:
    total = 0
    for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
        if t is not None and hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def expert_storage(model) -> dict:
    """Count fused expert weights: how many, how many 4-bit, their stored bytes, and what bf16 would take."""
    counts = dict(expert_tensors=0, quantized=0, bytes=0, bf16_bytes=0)
    for _, module, names in iter_expert_stacks(model):
        for name in names:
            counts["expert_tensors"] += 1
            param = quantized_parametrization(module, name)
            raw = raw_tensor(module, name)
            if param is not None:
                counts["quantized"] += 1
                shape = param.logical_shape
                counts["bytes"] += raw.numel() * raw.element_size() + quant_state_bytes(param.quant_state)
            else:
                shape = tuple(raw.shape)
                counts["bytes"] += raw.numel() * raw.element_size()
            numel = 1
            for d in shape:
                numel *= d
            counts["bf16_bytes"] += 2 * numel
    return counts


# --------------------------------------------------------------------------------------------------------------
# which tensors a bitsandbytes 4-bit load stores in 4 bits


def claimed_expert_tensor(hf_quantizer, model, tensor_path: str):
    """(module path, module, tensor name) when ``tensor_path`` names a fused expert weight that this bnb 4-bit
    quantizer should store in 4 bits (not skipped by modules_to_not_convert); None otherwise."""
    if hf_quantizer is None or model is None or not is_bnb_4bit(hf_quantizer):
        return None
    module_path, _, name = tensor_path.rpartition(".")
    try:
        module = model.get_submodule(module_path) if module_path else model
    except AttributeError:
        return None
    counts = config_expert_counts(getattr(model, "config", None))
    if name not in candidate_stacks(module) and name not in flat_stacks(module, counts):
        return None
    if name not in expert_weight_names(module, _parent_children(model, module_path), counts):
        return None
    if is_skipped(module_path, skip_patterns(hf_quantizer)):
        return None
    return module_path, module, name


def quantize_experts_module(module, module_name: str, settings: QuantSettings, names=None) -> int:
    """Quantize every float expert weight of one experts module (``names``: its expert stacks, as
    :func:`expert_weight_names` found them with the module's siblings); returns how many were quantized."""
    done = 0
    for name in expert_weight_names(module) if names is None else names:
        if quantized_parametrization(module, name) is not None:
            continue
        raw = raw_tensor(module, name)
        if raw.device.type == "meta":
            continue
        quantize_expert_param(module, name, settings, owner=module_name or type(module).__name__)
        done += 1
    return done


def quantize_model_experts(model, quantization_config, skip_modules=()) -> int:
    """Quantize the fused experts of an already loaded model (biases stay float). Returns tensors quantized."""
    settings = QuantSettings.from_bnb_config(quantization_config)
    done = 0
    for name, module, names in list(iter_expert_stacks(model)):
        if is_skipped(name, skip_modules):
            continue
        done += quantize_experts_module(module, name, settings, names)
    return done


def check_whole_modules(model) -> list[str]:
    """After a 4-bit load: raise ExpertQuantError naming any module whose expert stacks are partly 4-bit (all or
    none, never some), and return the paths of 3D float tensors left as they are because they are no expert stack
    by structure (a lone 3D tensor without an expert sibling), for the load log."""
    counts = config_expert_counts(getattr(model, "config", None))
    grouped, partial = set(), []
    for name, module, names in iter_expert_stacks(model):
        grouped.add(name)
        left = [n for n in names if quantized_parametrization(module, n) is None]
        if left and len(left) != len(names):
            partial.append(f"{name}: {left} float, {[n for n in names if n not in left]} 4-bit")
    if partial:
        raise ExpertQuantError(f"expert modules partly stored 4-bit (all of a module's stacks or none): {partial}")
    return [f"{name}.{n}" for name, module in model.named_modules() if name not in grouped
            for n in candidate_stacks(module) + flat_stacks(module, counts)]
