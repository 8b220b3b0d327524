"""4-bit fused experts through transformers 4.x's loader (gpt_oss on 4.57).

Most MoE models on transformers 4.x keep per-expert ``nn.Linear`` experts, which bitsandbytes quantizes natively. A
few already fuse them into 3D parameters there (gpt_oss: ``gate_up_proj`` (E, H, 2I), ``down_proj`` (E, I, H), float
biases), and ``load_in_4bit`` leaves those in 16-bit, as on 5.x. The 4.x loader asks the quantizer about every
checkpoint tensor (``param_needs_quantization``) and hands the ones it claims to ``create_quantized_param``; we claim
fused expert tensors (found by structure, see :mod:`shims.quant.storage`) and store them in the same 4-bit parametrization:

- a float checkpoint: each expert tensor is quantized as it is read (the loader reads tensor by tensor);
- a pre-quantized checkpoint (written by ``save_pretrained`` with this patch, same keys as :mod:`shims.quant.checkpoint`:
  packed data under the tensor name + ``QuantState.as_dict(packed=True)`` keys): the packed data and its state are
  collected while reading and installed when ``_load_pretrained_model`` returns (before accelerate dispatches the
  model), without dequantizing. Packed data without a complete state raises :class:`~shims.quant.storage.ExpertQuantError`
  naming the tensor.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from functools import wraps

from . import storage
from .bnb_config import settings_of, skip_patterns
from .checkpoint import (
    install_saved_expert,
    packed_without_state_error,
    saved_quant_state,
    saving_quantized_experts,
    split_stat_key,
)
from .forward import PARAMETRIZE_CACHE_TARGETS
from ..loader_generation import V4, targets_for, transformers_loader
from ..registry import Patch, Target, chain_undo, swap_attr
from .storage import ExpertQuantError, claimed_expert_tensor, quantize_model_experts

log = logging.getLogger("shims")

_PENDING_ATTR = "_shims_pending_experts"


def _needed() -> str | None:
    if transformers_loader() != V4:
        return "transformers loads through core_model_loading here (see quantize_fused_experts)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'moe-shims[quant]')"
    return None


def expert_tensor_of(hf_quantizer, model, param_name: str):
    """(module path, module, tensor name, stat) when ``param_name`` is a fused expert tensor (or one of its saved
    QuantState keys) that this quantizer should store in 4-bit; None for everything else."""
    tensor_path, stat = split_stat_key(param_name)
    claimed = claimed_expert_tensor(hf_quantizer, model, tensor_path)
    return None if claimed is None else (*claimed, stat)


def _store_float(hf_quantizer, module_path, module, name, value, device) -> None:
    import torch

    value = value.to(device)
    if not value.is_floating_point():
        raise _missing_state_error(f"{module_path}.{name}", value)
    module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    storage.quantize_expert_param(module, name, settings_of(hf_quantizer), owner=module_path)


def _missing_state_error(tensor_path: str, value):
    return ExpertQuantError(
        f"{tensor_path}: the checkpoint stores packed {value.dtype} data {tuple(value.shape)} for this expert tensor "
        "but the model's quantization_config says it is not pre-quantized; refusing to load packed bytes as weights")


def fused_checkpoint_error(model, param_name: str):
    """The error for a fused 4-bit expert key (written by transformers 5.x + shims) whose model here keeps per-expert
    ``nn.Linear`` experts (a ModuleList: qwen3_moe, mixtral ... on 4.x); None for any other key.

    Upstream 4.x would otherwise fail with ``KeyError: '...mlp.experts.weight'`` deep in bitsandbytes' quantizer.
    """
    import torch

    tensor_path, _ = split_stat_key(param_name)
    module_path, _, name = tensor_path.rpartition(".")
    if name not in storage.EXPERT_WEIGHT_NAMES:
        return None
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    if not isinstance(module, torch.nn.ModuleList):
        return None
    import transformers

    return ExpertQuantError(
        f"{tensor_path}: the checkpoint stores fused 4-bit experts (as transformers 5.x with moe-shims saves them), "
        f"but transformers {transformers.__version__} builds {module_path} as per-expert nn.Linear modules and cannot "
        "load that layout. Load it with transformers >= 5 and shims.apply(), or export a float checkpoint "
        "(shims.save_merged) for transformers 4.x")


def install_pending(hf_quantizer, model) -> int:
    """Install the pre-quantized expert tensors collected while loading; returns how many."""
    pending = hf_quantizer.__dict__.pop(_PENDING_ATTR, {})
    for tensor_path, parts in pending.items():
        packed = parts.pop("", None)
        if packed is not None and not parts:
            raise packed_without_state_error(tensor_path, packed)
        state, problem = saved_quant_state(packed, parts, hf_quantizer)
        if problem is not None:
            raise ExpertQuantError(f"{tensor_path}: {problem}; refusing to load it")
        module_path, _, name = tensor_path.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        install_saved_expert(module, module_path, name, packed, state)
    return len(pending)


def _install():
    from transformers.modeling_utils import PreTrainedModel
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer as Q

    original_needs = Q.param_needs_quantization
    original_create = Q.create_quantized_param
    original_after = Q._process_model_after_weight_loading
    original_state_dict = Q.get_state_dict_and_metadata
    original_load = vars(PreTrainedModel)["_load_pretrained_model"].__func__
    load_signature = inspect.signature(original_load)

    @wraps(original_load)
    def _load_pretrained_model(cls, model, *args, **kwargs):
        result = original_load(cls, model, *args, **kwargs)
        hf_quantizer = load_signature.bind(cls, model, *args, **kwargs).arguments.get("hf_quantizer")
        if hf_quantizer is not None:
            install_pending(hf_quantizer, model)
        return result

    @wraps(original_needs)
    def param_needs_quantization(self, model, param_name, *args, **kwargs):
        if expert_tensor_of(self, model, param_name) is not None:
            return True
        return original_needs(self, model, param_name, *args, **kwargs)

    @wraps(original_create)
    def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
        found = expert_tensor_of(self, model, param_name)
        if found is None:
            error = fused_checkpoint_error(model, param_name) if self.pre_quantized else None
            if error is not None:
                raise error
            return original_create(self, model, param_value, param_name, target_device, *args, **kwargs)
        module_path, module, name, stat = found
        # Packed data is 2D (n, 1) whatever its storage dtype (a float quant_storage too); float weights are 3D.
        float_weights = stat == "" and param_value.is_floating_point() and param_value.dim() == 3
        if self.pre_quantized and not float_weights:
            parts = self.__dict__.setdefault(_PENDING_ATTR, {}).setdefault(f"{module_path}.{name}", {})
            parts[stat] = param_value.to(target_device)
            return None
        if stat:
            raise _missing_state_error(param_name, param_value)
        _store_float(self, module_path, module, name, param_value, target_device)
        return None

    @wraps(original_after)
    def process_model_after_weight_loading(self, model, **kwargs):
        installed = install_pending(self, model)
        # Safety net for expert tensors that did not pass through create_quantized_param (missing -> initialised).
        swept = quantize_model_experts(model, self.quantization_config, skip_patterns(self))
        if installed or swept:
            log.info("4-bit experts: %d loaded pre-quantized, %d quantized after loading", installed, swept)
        return original_after(self, model, **kwargs)

    return chain_undo([
        swap_attr(PreTrainedModel, "_load_pretrained_model", classmethod(_load_pretrained_model)),
        swap_attr(Q, "param_needs_quantization", param_needs_quantization),
        swap_attr(Q, "create_quantized_param", create_quantized_param),
        swap_attr(Q, "_process_model_after_weight_loading", process_model_after_weight_loading),
        swap_attr(Q, "get_state_dict_and_metadata", saving_quantized_experts(original_state_dict)),
    ])


_TARGETS = (
    Target("transformers.modeling_utils", "PreTrainedModel._load_pretrained_model", ("model", "hf_quantizer")),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.param_needs_quantization",
           ("model", "param_name")),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.create_quantized_param",
           ("model", "param_value", "param_name", "target_device")),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer._process_model_after_weight_loading",
           ("model",)),
    Target("transformers.quantizers.quantizer_bnb_4bit", "Bnb4BitHfQuantizer.get_state_dict_and_metadata",
           ("model",)),
    Target("bitsandbytes.functional", "QuantState.from_dict", ("qs_dict", "device")),
)

PATCHES: tuple = (
    Patch(
        name="quantize_fused_experts_v4",
        summary="transformers 4.x loader: BitsAndBytesConfig(load_in_4bit) also stores fused 3D expert weights "
                "(gpt_oss) in 4-bit, and saves / reloads them pre-quantized",
        # On 5.x these symbols (create_quantized_param) are gone and the patch is not needed.
        **targets_for(V4, required=_TARGETS + PARAMETRIZE_CACHE_TARGETS),
        needed=_needed,
        install=_install,
    ),
)
