"""Forward of a module whose weights the shims store in 4 bits (fused experts, routers).

No upstream forward is replaced: grouped_mm, batched_mm and eager experts, and every router, read their weight as
``self.gate_up_proj`` / ``self.weight``, which the 4-bit parametrization turns into the dequantized
tensor (:mod:`shims.quant.storage`). This module adds two per-module forward hooks to every module holding a shim 4-bit tensor, so that it
behaves at least as well as bitsandbytes' own ``Linear4bit``:

- a dequantization cache for the duration of ONE forward (eager experts index ``gate_up_proj[e]`` once per
  expert; without the cache every index would dequantize the whole stack). The cache is torch's parametrize cache,
  enabled on entry and dropped on exit (``always_call`` so an exception or a checkpointing early-stop still drops
  it): the float copy lives for one layer's forward only.
- a compute-dtype cast, as ``Linear4bit`` does: the hidden states are cast to the dequantized dtype (the compute
  dtype) on entry and every float output back to the caller's dtype on exit. This is what the standard QLoRA recipe
  needs: ``peft.prepare_model_for_kbit_training`` upcasts norms and embeddings to float32, so float32 hidden states
  reach a 4-bit router or experts module whose weights dequantize to bf16/fp16 (routers call ``F.linear`` and eager
  experts ``@`` without casting).
- the module's other float parameters (gpt_oss expert and router biases), which the same recipe upcasts to
  float32, are read in the compute dtype for the duration of the forward. ``Linear4bit`` casts its bias per call
  too; here a cast copy shadows the parameter in the module's ``__dict__`` and is removed on exit, so the stored
  parameter keeps its dtype and a trainable bias still receives its gradient through the cast.
"""

from __future__ import annotations

import functools
import logging

from ..registry import Target

log = logging.getLogger("shims")

PATCHES: tuple = ()  # nothing upstream is replaced; the hooks are attached per module by shims.quant.storage

# The per-forward cache toggles torch's parametrize module state directly (what its ``cached()`` context manager
# does, but across two hooks). Every patch that installs 4-bit tensors declares these, so status() reports a torch
# that renames them instead of every forward failing.
PARAMETRIZE_CACHE_TARGETS = (
    Target("torch.nn.utils.parametrize", "_cache_enabled"),
    Target("torch.nn.utils.parametrize", "_cache"),
)

_HOOKS_ATTR = "_shims_forward_hooks"
_FRAMES_ATTR = "_shims_forward_frames"


def _cast_input(args, kwargs, dtype):
    """(args, kwargs, caller's dtype) with the hidden states (first positional or ``hidden_states=``) in ``dtype``."""
    if args:
        hidden, rest = args[0], args[1:]
    elif "hidden_states" in kwargs:
        hidden, rest = kwargs["hidden_states"], None
    else:
        return args, kwargs, None
    if not getattr(hidden, "is_floating_point", lambda: False)():
        return args, kwargs, None
    in_dtype = hidden.dtype
    if dtype is None or in_dtype == dtype:
        return args, kwargs, in_dtype
    if rest is not None:
        return (hidden.to(dtype),) + tuple(rest), kwargs, in_dtype
    return args, {**kwargs, "hidden_states": hidden.to(dtype)}, in_dtype


def _shadow_float_params(module, dtype) -> list[str]:
    """Shadow each float parameter not in ``dtype`` by a cast copy for this forward; returns the names shadowed."""
    if dtype is None:
        return []
    shadowed = []
    for name, param in module._parameters.items():
        if param is not None and param.is_floating_point() and param.dtype != dtype:
            module.__dict__[name] = param.to(dtype)  # found before nn.Module.__getattr__ looks in _parameters
            shadowed.append(name)
    return shadowed


def _cast_output(output, dtype):
    import torch

    if dtype is None:
        return None
    if isinstance(output, torch.Tensor):
        return output.to(dtype) if output.is_floating_point() and output.dtype != dtype else None
    if isinstance(output, tuple) and any(isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != dtype
                                         for o in output):
        return tuple(o.to(dtype) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in output)
    return None


def _enter(module, args, kwargs, dtype=None):
    import torch.nn.utils.parametrize as P

    new_args, new_kwargs, in_dtype = _cast_input(args, kwargs, dtype)
    module.__dict__.setdefault(_FRAMES_ATTR, []).append((in_dtype, _shadow_float_params(module, dtype)))
    P._cache_enabled += 1  # after the frame is pushed: _exit undoes exactly what a pushed frame did
    if new_args is args and new_kwargs is kwargs:
        return None
    return new_args, new_kwargs


def _exit(module, args, kwargs, output):
    import torch.nn.utils.parametrize as P

    # Only undo what _enter did: with always_call this runs even when _enter never ran (or raised).
    frames = module.__dict__.get(_FRAMES_ATTR)
    if not frames:
        return None
    in_dtype, shadowed = frames.pop()
    for name in shadowed:
        module.__dict__.pop(name, None)
    P._cache_enabled = max(0, P._cache_enabled - 1)
    if not P._cache_enabled:
        P._cache = {}
    return _cast_output(output, in_dtype)


def install_forward_hooks(module, compute_dtype) -> None:
    """Attach the per-forward dequantization cache and dtype casts to a module holding shim 4-bit tensors (once).

    ``compute_dtype``: what the module's 4-bit tensors dequantize to; all tensors of one module (the expert weights
    of one experts module, or a router's weight) are stored with the same settings, so the first one decides.
    """
    if getattr(module, _HOOKS_ATTR, None) is not None:
        return
    pre = module.register_forward_pre_hook(functools.partial(_enter, dtype=compute_dtype), with_kwargs=True)
    post = module.register_forward_hook(_exit, with_kwargs=True, always_call=True)
    object.__setattr__(module, _HOOKS_ATTR, (pre, post))


def remove_forward_hooks(module) -> None:
    handles = getattr(module, _HOOKS_ATTR, None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    object.__setattr__(module, _HOOKS_ATTR, None)
