"""merge / unmerge of LoRA into shim-quantized 4-bit expert tensors (peft "Bug E").

peft's ``ParamWrapper.merge`` does ``param.data += delta``; on a parametrized tensor ``param`` is a freshly
dequantized temporary, so the merge silently does nothing (and ``unmerge`` would then subtract a delta that was
never added). For quantized tensors we instead: dequantize, add peft's OWN ``get_delta_weight`` (its layout
convention, in float32), check finiteness when ``safe_merge``, and re-quantize with the same settings.

Unmerge: by default the packed bytes and quantization state from before the merge are kept while an adapter is
merged (one extra packed copy, ~0.28x of the bf16 experts), and unmerge puts them back, so merge_adapter /
unmerge_adapter cycles (e.g. generation during training) restore the base weights bit for bit instead of adding
re-quantization noise each cycle. Set ``KEEP_PREMERGE_COPY = False`` to save that memory: unmerge then dequantizes,
subtracts the delta and re-quantizes (error within about two 4-bit quantization steps of the original).
"""

from __future__ import annotations

import logging
from functools import wraps

from ..lora.peft_experts import needs_4bit_expert_lora
from ..registry import Patch, Target, chain_undo, swap_attr
from ..quant.storage import dequantize_param, quantized_parametrization, requantize_param

log = logging.getLogger("shims")

KEEP_PREMERGE_COPY = True
_STASH_ATTR = "_shims_premerge"


def _merge_quantized(wrapper, adapter_names, safe_merge: bool) -> None:
    import torch

    base = wrapper.get_base_layer()
    name = wrapper.parameter_name
    param = quantized_parametrization(base, name)
    stash = wrapper.__dict__.setdefault(_STASH_ATTR, [])
    for adapter in adapter_names:
        if adapter not in wrapper.lora_A.keys():
            continue
        weight = dequantize_param(base, name).to(torch.float32)
        merged = weight + wrapper.get_delta_weight(adapter).to(torch.float32)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken "
                             f"({param.owner})")
        if KEEP_PREMERGE_COPY:
            original = base.parametrizations[name].original
            stash.append((adapter, original.detach().clone(), param.quant_state))
        requantize_param(base, name, merged)
        wrapper.merged_adapters.append(adapter)


def _unmerge_quantized(wrapper) -> None:
    import torch

    base = wrapper.get_base_layer()
    name = wrapper.parameter_name
    param = quantized_parametrization(base, name)
    stash = wrapper.__dict__.setdefault(_STASH_ATTR, [])
    while wrapper.merged_adapters:
        adapter = wrapper.merged_adapters.pop()
        if adapter not in wrapper.lora_A.keys():
            continue
        if stash and stash[-1][0] == adapter:
            _, packed, quant_state = stash.pop()
            base.parametrizations[name].original.data = packed
            param.quant_state = quant_state
            continue
        weight = dequantize_param(base, name).to(torch.float32)
        requantize_param(base, name, weight - wrapper.get_delta_weight(adapter).to(torch.float32))


def _install():
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import check_adapters_to_merge

    original_merge = ParamWrapper.merge
    original_unmerge = ParamWrapper.unmerge

    @wraps(original_merge)
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if quantized_parametrization(self.get_base_layer(), self.parameter_name) is None:
            return original_merge(self, safe_merge=safe_merge, adapter_names=adapter_names)
        names = check_adapters_to_merge(self, adapter_names)
        if names:
            _merge_quantized(self, names, safe_merge)
        return None

    @wraps(original_unmerge)
    def unmerge(self) -> None:
        if quantized_parametrization(self.get_base_layer(), self.parameter_name) is None:
            return original_unmerge(self)
        if not self.merged:
            log.warning("Already unmerged. Nothing to do.")
            return None
        _unmerge_quantized(self)
        return None

    return chain_undo([swap_attr(ParamWrapper, "merge", merge), swap_attr(ParamWrapper, "unmerge", unmerge)])


PATCHES: tuple = (
    Patch(
        name="peft_merge_quantized_experts",
        summary="merge/unmerge/merge_and_unload of expert LoRA into 4-bit experts: dequantize + peft delta + "
                "re-quantize (safe_merge refuses non-finite; unmerge restores the pre-merge bytes)",
        targets=(
            Target("peft.tuners.lora.layer", "ParamWrapper.merge", ("safe_merge", "adapter_names")),
            Target("peft.tuners.lora.layer", "ParamWrapper.unmerge"),
            Target("peft.tuners.lora.layer", "ParamWrapper.get_delta_weight", ("adapter_name",)),
            Target("peft.tuners.tuners_utils", "check_adapters_to_merge", ("module", "adapter_names")),
        ),
        needed=needs_4bit_expert_lora,
        install=_install,
    ),
)
