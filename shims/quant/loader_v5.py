"""transformers 5.x's loader patch: ``load_in_4bit`` also stores fused MoE expert weights in 4 bits.

Upstream (all 5.x checked, 5.5 ... 5.24) quantizes only ``nn.Linear`` under ``BitsAndBytesConfig(load_in_4bit=True)``:
the fused 3D expert tensors (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); gpt_oss transposed, with float
biases) stay in 16/32-bit. This patch stores them with the shims' 4-bit storage (:mod:`shims.quant.storage`).

They are quantized tensor by tensor while the checkpoint is read (``set_param_for_module`` is wrapped; where the
checkpoint holds per-expert tensors, the fusing ``WeightConverter`` is run a chunk of experts at a time and each chunk
quantized at once), so the load peak is the packed model plus one fused float tensor at most; a sweep after loading
catches any expert tensor that did not pass through that path (e.g. initialised because it was missing from the
checkpoint). :func:`loader_hooks` is shared with the router patch (:mod:`shims.quant.quant_router`).
"""

from __future__ import annotations

import importlib.util
import logging
from functools import wraps

from .bnb_config import settings_of, skip_patterns
from .forward import PARAMETRIZE_CACHE_TARGETS
from ..loader_generation import V5, targets_for, transformers_loader
from . import storage
from ..registry import Patch, Target, chain_undo, swap_attr
from .storage import (
    ExpertPacker,
    ExpertQuantError,
    claimed_expert_tensor,
    effective_blocksize,
    experts_per_chunk,
    experts_split_into_blocks,
    install_packed_param,
    quantize_model_experts,
    quantized_tensor_names,
    raw_tensor,
)

log = logging.getLogger("shims")

SET_PARAM_TARGET = Target("transformers.core_model_loading", "set_param_for_module",
                 ("model", "target_name", "param_value", "hf_quantizer"))
CONVERTER_TARGET = Target("transformers.core_model_loading", "WeightConverter.convert",
                    ("layer_name", "model", "config", "hf_quantizer", "loading_info"))
AFTER_LOAD_TARGET = Target("transformers.quantizers.quantizer_bnb_4bit",
                     "Bnb4BitHfQuantizer._process_model_after_weight_loading", ("model",))
# Before reading any weight, from_pretrained reserves GPU memory for the whole model (caching_allocator_warmup), sized
# by the quantizer's param_element_size: 0.5 byte for Linear4bit weights, the float size for everything else. Fused
# experts (most of an MoE) were counted in bf16, so that one reservation alone was 2.3x the 4-bit model.
# After loading, transformers initialises every module not flagged as loaded; an experts module's _init_weights reads
# module.gate_up_proj, which for 4-bit experts dequantizes the whole tensor (a throwaway float copy: on an H200 the
# largest transient of the load, 0.75 GiB for one Qwen3-30B-A3B gate_up).
INIT_TARGET = Target("transformers.modeling_utils", "PreTrainedModel._initialize_weights", ("module",))
WARMUP_SIZE_TARGET = Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.param_element_size",
                      ("model", "param_name", "param"))


def v5_loader_needed() -> str | None:
    """None when the 5.x loader patches (experts, routers, checkpoint) can work here, else why they are not needed."""
    if transformers_loader() != V5:
        return ("transformers loads through its 4.x loader here: fused experts (gpt_oss) are handled by "
                "quantize_fused_experts_v4; per-expert nn.Linear experts are quantized natively (Linear4bit)")
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'moe-shims[quant]')"
    return None


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
    settings = settings_of(hf_quantizer)
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
    packer = ExpertPacker(shape, compute_dtype, effective_blocksize(settings.blocksize), settings.quant_type,
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
    original_size = Bnb4BitHfQuantizer.param_element_size if WARMUP_SIZE_TARGET.drift() == "ok" else None

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
    raw = raw_tensor(module, param_name)
    # If upstream ever quantizes experts itself the tensor arrives non-float: then we leave it alone.
    if raw is not None and raw.is_floating_point() and raw.device.type != "meta":
        storage.quantize_expert_param(module, param_name, settings_of(hf_quantizer), owner=module_path)


def missing_experts_sweep(hf_quantizer, model) -> int:
    """Expert tensors that did not pass through set_param_for_module (missing from the checkpoint -> initialised);
    then every experts module must be wholly 4-bit or wholly float, and 3D tensors that are no expert stack by
    structure are named in the load log (INFO)."""
    done = quantize_model_experts(model, hf_quantizer.quantization_config, skip_patterns(hf_quantizer))
    left = storage.check_whole_modules(model)
    if left:
        log.info("left float, not expert stacks by structure (no sibling with as many experts): %s", left)
    return done


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
    if CONVERTER_TARGET.drift() == "ok":
        undos.append(swap_attr(cml.WeightConverter, "convert", convert))
    if INIT_TARGET.drift() == "ok":
        undos.append(skip_init_of_loaded_experts())
    return chain_undo(undos)


PATCHES: tuple = (
    Patch(
        name="quantize_fused_experts",
        summary="BitsAndBytesConfig(load_in_4bit) also stores fused 3D MoE expert weights in 4-bit "
                "(packed + QuantState, dequantized per forward)",
        # The converter, element-size and init wraps only lower the load peak (per-expert streaming, a 4-bit sized
        # GPU warm-up, no throwaway dequantization); without them loading still quantizes.
        **targets_for(V5, required=(SET_PARAM_TARGET, AFTER_LOAD_TARGET) + PARAMETRIZE_CACHE_TARGETS,
                      optional=(CONVERTER_TARGET, WARMUP_SIZE_TARGET, INIT_TARGET)),
        needed=v5_loader_needed,
        install=_install,
    ),
)
