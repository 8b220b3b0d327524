"""Experts forward with 4-bit expert weights.

No upstream experts implementation is replaced: grouped_mm, batched_mm and eager all read ``self.gate_up_proj`` /
``self.down_proj``, which the 4-bit parametrization (shims.quant) turns into the dequantized tensor. This module
adds two per-module forward hooks to every quantized experts module:

- a dequantization cache for the duration of ONE experts forward (eager indexes ``gate_up_proj[e]`` once per
  expert; without the cache every index would dequantize the whole stack). The cache is torch's parametrize cache,
  enabled on entry and dropped on exit (``always_call`` so an exception or a checkpointing early-stop still drops
  it): the float copy lives for one layer's forward only.
- a compute-dtype cast, as bitsandbytes' Linear4bit does: hidden states are cast to the dequantized dtype
  (bnb_4bit_compute_dtype) on entry and the output back to the caller's dtype on exit, so that a bf16 model with
  fp32 compute (or the reverse) runs in every implementation (eager and batched_mm do not cast themselves).
"""

from __future__ import annotations

import logging

log = logging.getLogger("shims")

PATCHES: tuple = ()  # nothing upstream is replaced; the hooks are attached per module by shims.quant

_HOOKS_ATTR = "_shims_forward_hooks"


def _compute_dtype(module):
    from .quant import EXPERT_WEIGHT_NAMES, quantized_parametrization

    for name in EXPERT_WEIGHT_NAMES:
        p = quantized_parametrization(module, name)
        if p is not None:
            return p.settings.compute_dtype
    return None


def _enter(module, args, kwargs):
    import torch.nn.utils.parametrize as P

    P._cache_enabled += 1
    module._shims_cache_depth = getattr(module, "_shims_cache_depth", 0) + 1
    dtype = _compute_dtype(module)
    stack = module.__dict__.setdefault("_shims_dtype_stack", [])
    if args:
        hidden = args[0]
        stack.append(hidden.dtype)
        if dtype is not None and hidden.is_floating_point() and hidden.dtype != dtype:
            return (hidden.to(dtype),) + tuple(args[1:]), kwargs
    elif "hidden_states" in kwargs:
        hidden = kwargs["hidden_states"]
        stack.append(hidden.dtype)
        if dtype is not None and hidden.is_floating_point() and hidden.dtype != dtype:
            return args, {**kwargs, "hidden_states": hidden.to(dtype)}
    else:
        stack.append(None)
    return None


def _exit(module, args, kwargs, output):
    import torch
    import torch.nn.utils.parametrize as P

    # Only undo what _enter did: with always_call this runs even when _enter never ran.
    if getattr(module, "_shims_cache_depth", 0) > 0:
        module._shims_cache_depth -= 1
        P._cache_enabled = max(0, P._cache_enabled - 1)
        if not P._cache_enabled:
            P._cache = {}
    stack = module.__dict__.get("_shims_dtype_stack")
    in_dtype = stack.pop() if stack else None
    if in_dtype is not None and isinstance(output, torch.Tensor) and output.dtype != in_dtype:
        return output.to(in_dtype)
    if in_dtype is not None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) \
            and output[0].dtype != in_dtype:
        return (output[0].to(in_dtype),) + tuple(output[1:])
    return None


def install_forward_hooks(module) -> None:
    """Attach the per-forward dequantization cache and dtype cast to a quantized experts module (once)."""
    if getattr(module, _HOOKS_ATTR, None) is not None:
        return
    pre = module.register_forward_pre_hook(_enter, with_kwargs=True)
    post = module.register_forward_hook(_exit, with_kwargs=True, always_call=True)
    object.__setattr__(module, _HOOKS_ATTR, (pre, post))


def remove_forward_hooks(module) -> None:
    handles = getattr(module, _HOOKS_ATTR, None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    object.__setattr__(module, _HOOKS_ATTR, None)
