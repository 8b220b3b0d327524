"""Fast expert LoRA on 4-bit experts: the LoRA term from the routed tokens only.

peft's ``ParamWrapper`` runs an experts module with LoRA by registering ``W + delta`` as a parametrization of the
expert tensor, i.e. it materialises the full (E, d1, d2) delta AND W + delta for ALL experts on every forward (and
autograd keeps them until backward). On a real MoE that dominates train peak memory and time.

When shims are applied, the OUTERMOST ``ParamWrapper`` of a chain whose base is a shim-quantized experts module runs
:func:`routed_lora_forward` instead (if :func:`plan_of` accepts the chain, otherwise peft's own path):

- tokens are grouped by expert (only experts that received tokens do any work);
- the base projection uses the layer's dequantized expert stack, dequantized transiently inside an autograd
  function that keeps nothing float for backward: backward dequantizes again (as bitsandbytes' 4-bit matmul does).
  The one exception is a gradient-checkpointing recompute (:func:`recomputing`): this layer's backward follows it at
  once, so the recomputed stack is kept for that backward and dropped there (one dequantization fewer per projection
  and step, at the cost of one layer's float stacks during its backward);
- the LoRA term per expert e is ``scaling * (x_e @ rhs_e^T) @ lhs_e^T`` (``x_e @ lhs_e @ rhs_e`` for transposed
  experts), with ``delta_e = lhs_e @ rhs_e`` exactly peft's ``ParamWrapper.get_delta_weight`` convention: A rows
  ``e*r:(e+1)*r``, B columns ``e::E``; ``_did_swap_in_out_features`` decides which factor is on which side.
- the expert math (gate/up split and activation via the module's own ``_apply_gate`` / ``act_fn``, biases,
  optional post-expert norm, routing weights) is read from the flags transformers 5.x sets on every experts class
  (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``), so it REPLACES whichever experts
  implementation (grouped_mm, batched_mm, eager) the config selects, for wrapped 4-bit experts only.

Kernels (:func:`kernel_of`, shown by :func:`path_of` as ``"fast (grouped)"`` / ``"fast (loop: <why>)"``): the
routed products run as three grouped matmuls per projection (base, ``x @ A^T``, ``@ B^T``) through
``torch._grouped_mm`` -- forward and backward -- when the kernel runs for the layer's device and compute dtype (probed
once per device/dtype with a tiny call, as feature detection) and every row it touches is 16-byte aligned (the
kernel's stride rule: hidden, expert and rank dims times the element size); otherwise a Python loop over experts
with the same math. ``KERNEL = "loop"`` forces the loop (comparisons, benchmarks).

Fallback rule (documented, logged at debug, inspectable with :func:`path_of`): peft's path is used whenever the chain
is not understood: experts not 4-bit, several or no active adapters, merged or disabled adapters, expert parallelism,
an unknown tensor name or call signature, missing experts flags, or ``ENABLED = False``. Also, and logged at info
once per class and listed in ``shims.status()`` details (:func:`why_not_understood`): an experts class whose forward
is not transformers' experts-implementation dispatch (ergo's ErgoExperts overrides it), or a module holding tensors
or submodules beyond what the flags describe (ergo's per-expert norm).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import weakref
from dataclasses import dataclass, field

from ..adapters.lora_layout import SWAP_FLAG_TARGET, did_swap_in_out_features
from .peft_experts import needs_4bit_expert_lora
from ..registry import Patch, Target, chain_undo, swap_attr
from ..quant.storage import dequantize_param, quantized_parametrization

log = logging.getLogger("shims")

KERNEL = "auto"  # "auto": grouped where torch._grouped_mm runs for the layer, else the loop; "loop": always loop
ENABLED = True  # runtime switch (e.g. to compare both paths in one process); the registry patch installs the hook
FAST = "fast"
_IN_PEFT_PATH = contextvars.ContextVar("shims_fast_lora_in_peft_path", default=False)
_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


@dataclass
class FastPlan:
    base: object  # the experts module
    adapter: str
    wrappers: dict = field(default_factory=dict)  # tensor name -> ParamWrapper
    kernel: str = "loop"  # "grouped" or "loop: <why not grouped>" (see kernel_of)


def _chain(wrapper):
    from peft.tuners.lora.layer import ParamWrapper

    wrappers, module = [], wrapper
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def plan_of(wrapper) -> FastPlan | str:
    """A FastPlan when the fast path can run ``wrapper`` (an outermost ParamWrapper), else the reason why not."""
    if not ENABLED:
        return "fast path disabled (shims.lora.fast_lora.ENABLED = False)"
    wrappers, base = _chain(wrapper)
    if not wrappers:
        return "not a peft ParamWrapper"
    missing = [f for f in _FLAGS if not hasattr(base, f)]
    if missing:
        return f"experts module {type(base).__name__} lacks {missing} (not a transformers 5.x experts class)"
    if getattr(base, "_is_expert_parallel", False):
        return "expert parallelism"
    refusal = why_not_understood(base)
    if refusal is not None:
        _report_refusal(base, refusal)
        return refusal
    gate_name = "gate_up_proj" if base.has_gate else "up_proj"
    if not base.has_gate and not hasattr(base, "act_fn"):
        return "non-gated experts without act_fn"
    if base.has_gate and not hasattr(base, "_apply_gate"):
        return "gated experts without _apply_gate"
    for name in (gate_name, "down_proj"):
        if quantized_parametrization(base, name) is None:
            return f"{type(base).__name__}.{name} is not a shim-quantized 4-bit tensor"
        if len(base.parametrizations[name]) != 1:
            return f"{type(base).__name__}.{name} carries another parametrization (LoRA active elsewhere)"
    adapters = set()
    plan = FastPlan(base=base, adapter="")
    for w in wrappers:
        if w.parameter_name not in (gate_name, "down_proj") or w.parameter_name in plan.wrappers:
            return f"unexpected or repeated target tensor {w.parameter_name!r}"
        if w.disable_adapters:
            return "adapters disabled"
        if w.merged:
            return "adapter merged"
        active = [a for a in w.active_adapters if a in w.lora_A]
        if len(active) != 1:
            return f"{len(active)} active adapters on {w.parameter_name} (fast path handles exactly one)"
        if w.lora_bias.get(active[0], False):
            return "lora_bias"
        if w.num_experts != base.num_experts or w.num_experts < 2:
            return f"num_experts {w.num_experts} != {base.num_experts}"
        adapters.add(active[0])
        plan.wrappers[w.parameter_name] = w
    if len(adapters) != 1:
        return f"different active adapters across the chain: {sorted(adapters)}"
    plan.adapter = adapters.pop()
    why_not = _why_not_grouped(plan)
    plan.kernel = "grouped" if why_not is None else f"loop: {why_not}"
    return plan


# --------------------------------------------------------------------------------------------------------------
# which experts modules the fast path understands
#
# The fast path stands in for the experts-implementation DISPATCH that transformers' ``use_experts_implementation``
# installs as the class's forward (grouped_mm / batched_mm / eager all compute the same thing from the flags). A class
# that puts its own forward over that dispatch (ergo's ErgoExperts repeats each token per route and applies a
# per-expert RMSNorm before summing) computes something else, and so does a module holding tensors the flags do not
# describe: for those the fast path would be silently wrong, so peft's path runs (which calls the module's forward).

# Direct children an experts module may have besides its stacks: torch's parametrization container (the 4-bit
# storage, and peft's LoRA while active) and the activation the fast path calls itself.
_KNOWN_CHILDREN = ("parametrizations", "act_fn")
_REFUSED: dict = {}  # "module.qualname" of an experts class -> why the fast path refused it (status() details)


@functools.cache
def _dispatch_code():
    """The code object of the forward ``use_experts_implementation`` installs, or None where this transformers has
    no such decorator. Found by decorating a private probe class: every decorated class's forward is a closure over
    that one code object, so this identifies the dispatch without reading transformers' source or version."""
    import torch

    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:
        return None

    class _DispatchProbe(torch.nn.Module):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    return getattr(use_experts_implementation(_DispatchProbe).forward, "__code__", None)


@functools.lru_cache(maxsize=None)
def _forward_refusal(cls: type) -> str | None:
    """Why ``cls``'s forward is not the experts-implementation dispatch (the forward the fast path emulates)."""
    owner = next((k for k in cls.__mro__ if "forward" in vars(k)), None)
    dispatch = _dispatch_code()
    if dispatch is None:
        return "this transformers has no use_experts_implementation dispatch to emulate"
    if owner is None or getattr(vars(owner)["forward"], "__code__", None) is not dispatch:
        where = owner.__qualname__ if owner is not None else cls.__qualname__
        return (f"{where} defines its own forward over the experts-implementation dispatch (the fast path only "
                "stands in for that dispatch)")
    return None


def _unknown_state(base) -> list[str]:
    """Names of the direct children, parameters and buffers of ``base`` the fast path would not apply: anything but
    the stacks (parametrized when 4-bit, plain parameters when float), the activation, biases (``has_bias``) and the
    post-expert norm (``has_post_expert_norm``)."""
    stacks = ("gate_up_proj" if base.has_gate else "up_proj", "down_proj")
    known = set(_KNOWN_CHILDREN) | set(stacks)
    if getattr(base, "has_post_expert_norm", False):
        known.add("post_expert_norm")
    if base.has_bias:
        known |= {f"{name}_bias" for name in stacks}
    found = list(base._modules) + list(base._parameters) + list(base._buffers)
    return sorted(name for name in found if name not in known)


def _experts_class(base) -> type:
    """``base``'s model class: torch's parametrize gives every parametrized module a class of its own on top."""
    return next(k for k in type(base).__mro__ if not k.__module__.startswith("torch."))


def why_not_understood(base) -> str | None:
    """None when the fast path computes exactly what ``base``'s own forward does (given its flags), else why not."""
    refusal = _forward_refusal(_experts_class(base))
    if refusal is not None:
        return refusal
    unknown = _unknown_state(base)
    if unknown:
        return f"{_experts_class(base).__name__} holds {unknown} beyond its expert stacks (e.g. a per-expert norm)"
    return None


def _report_refusal(base, reason: str) -> None:
    """Record (for status()) and log, once per experts class, that the fast path refused it."""
    cls = _experts_class(base)
    key = f"{cls.__module__}.{cls.__qualname__}"
    if _REFUSED.get(key) != reason:
        _REFUSED[key] = reason
        log.info("fast_expert_lora: %s runs on peft's path: %s", key, reason)


def refused_classes() -> dict[str, str]:
    """{experts class: why the fast path refused it} for every class refused so far in this process."""
    return dict(_REFUSED)


def path_of(module) -> str:
    """Which path the ParamWrapper ``module`` (outermost of its chain) uses: ``"fast (grouped)"``,
    ``"fast (loop: <why not grouped>)"`` or ``"peft: <why not fast>"``."""
    plan = plan_of(module)
    return f"{FAST} ({plan.kernel})" if isinstance(plan, FastPlan) else f"peft: {plan}"


def kernel_of(module) -> str | None:
    """``"grouped"`` or ``"loop: <why>"`` for a ParamWrapper on the fast path; None where peft's path runs."""
    plan = plan_of(module)
    return plan.kernel if isinstance(plan, FastPlan) else None


def expert_lora_paths(model) -> dict[str, str]:
    """{module name: path_of(...)} for every outermost expert ParamWrapper of ``model``."""
    from peft.tuners.lora.layer import ParamWrapper

    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, ParamWrapper)}
    return {name: path_of(m) for name, m in model.named_modules()
            if isinstance(m, ParamWrapper) and id(m) not in inner}


# --------------------------------------------------------------------------------------------------------------
# the math


def _factors(wrapper, adapter: str, expert: int):
    """(lhs, rhs, scaling) with peft's delta_e = scaling * lhs @ rhs, shaped like the param's (d1, d2) slice."""
    E = wrapper.num_experts
    A = wrapper.lora_A[adapter].weight  # (E*r, in_features)
    B = wrapper.lora_B[adapter].weight  # (out_features, E*r)
    r = A.shape[0] // E
    a_e = A[expert * r:(expert + 1) * r]  # (r, in)
    b_e = B.reshape(B.shape[0], r, E)[:, :, expert]  # (out, r): expert index fastest in B's columns
    if did_swap_in_out_features(wrapper):
        return b_e, a_e, wrapper.scaling[adapter]  # delta_e = B_e A_e (param is (E, out, in))
    return a_e.t(), b_e.t(), wrapper.scaling[adapter]  # delta_e = A_e^T B_e^T (param is (E, in, out))


def _lora_term(x_parts, wrapper, adapter, transposed: bool, dtype):
    outs = []
    for e, x_e in enumerate(x_parts):
        if x_e.shape[0] == 0:
            continue
        lhs, rhs, s = _factors(wrapper, adapter, e)
        lhs, rhs = lhs.to(dtype), rhs.to(dtype)
        # forward uses x @ W_e (transposed) or x @ W_e^T; the delta adds x @ delta_e or x @ delta_e^T
        outs.append(((x_e @ lhs) @ rhs if transposed else (x_e @ rhs.t()) @ lhs.t()) * s)
    return outs


def recomputing() -> bool:
    """True while autograd's engine runs a backward pass: a forward running then is a checkpoint recompute (reentrant
    or not), whose saved tensors are unpacked by this layer's backward right after. Feature-detected: torch's graph
    task id (-1 outside a backward); without it, never."""
    import torch

    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# Stacks dequantized by a checkpoint recompute, for the backward that follows: experts module -> {tensor name: stack}.
# Not saved through autograd: non-reentrant checkpointing requires a recompute to save exactly what the first forward
# saved, and the first forward must keep nothing float (it cannot tell whether a recompute will follow).
_RECOMPUTED = weakref.WeakKeyDictionary()


def _keep_if_recomputing(base, name: str, weight) -> None:
    if recomputing():
        _RECOMPUTED.setdefault(base, {})[name] = weight


def _take_recomputed(base, name: str):
    """The stack kept by this tensor's recompute (removed: the backward uses it once), or None."""
    return _RECOMPUTED.get(base, {}).pop(name, None)


def _weight_for_backward(ctx, dtype):
    """The float stack for backward: kept by a checkpoint recompute, else dequantized again."""
    kept = _take_recomputed(ctx.base, ctx.name)
    return kept.to(dtype) if kept is not None else dequantize_param(ctx.base, ctx.name).to(dtype)


def _routed_matmul_class():
    import torch

    class RoutedDequantMatmul(torch.autograd.Function):
        """Per expert x_e @ W_e^T (or x_e @ W_e when transposed) with W dequantized transiently, also in backward."""

        @staticmethod
        def forward(ctx, x_sorted, counts, base, name, transposed):
            ctx.counts, ctx.base, ctx.name, ctx.transposed = counts, base, name, transposed
            with torch.no_grad():
                weight = dequantize_param(base, name).to(x_sorted.dtype)
                parts = [x_e @ (weight[e] if transposed else weight[e].t())
                         for e, x_e in enumerate(x_sorted.split(counts)) if counts[e]]
            _keep_if_recomputing(base, name, weight)
            out_dim = weight.shape[2] if transposed else weight.shape[1]
            del weight
            return torch.cat(parts) if parts else x_sorted.new_zeros(0, out_dim)

        @staticmethod
        def backward(ctx, grad_out):
            if not ctx.needs_input_grad[0]:
                _take_recomputed(ctx.base, ctx.name)
                return None, None, None, None, None
            weight = _weight_for_backward(ctx, grad_out.dtype)
            parts = [g_e @ (weight[e].t() if ctx.transposed else weight[e])
                     for e, g_e in enumerate(grad_out.split(ctx.counts)) if ctx.counts[e]]
            in_dim = weight.shape[1] if ctx.transposed else weight.shape[2]
            del weight
            grad = torch.cat(parts) if parts else grad_out.new_zeros(0, in_dim)
            return grad, None, None, None, None

    return RoutedDequantMatmul


_MATMUL = None


def _matmul():
    global _MATMUL
    if _MATMUL is None:
        _MATMUL = _routed_matmul_class()
    return _MATMUL


def _project(plan, name, x_sorted, counts, expert_sorted, dtype):
    import torch  # noqa: F401

    base = plan.base
    transposed = bool(base.is_transposed)
    out = _matmul().apply(x_sorted, counts, base, name, transposed)
    if base.has_bias:
        out = out + getattr(base, f"{name}_bias")[expert_sorted].to(dtype)
    wrapper = plan.wrappers.get(name)
    if wrapper is not None:
        parts = [p for p in x_sorted.split(counts)]
        lora = _lora_term(parts, wrapper, plan.adapter, transposed, dtype)
        if lora:
            out = out + torch.cat(lora)
    return out


def routed_lora_forward(plan: FastPlan, hidden_states, top_k_index, top_k_weights):
    """The experts forward with 4-bit base weights + the plan's LoRA, computed from the routed tokens only."""
    import torch

    base = plan.base
    E = base.num_experts
    gate_name = "gate_up_proj" if base.has_gate else "up_proj"
    compute_dtype = quantized_parametrization(base, gate_name).settings.compute_dtype or hidden_states.dtype
    x = hidden_states.to(compute_dtype)
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    expert_sorted, order = torch.sort(expert_ids, stable=True)
    token_sorted = order // top_k
    # bincount sizes its output from the largest id (a device-to-host sync on CUDA); a scatter into fixed bins does
    # not. Ids >= E (experts not on this module) count in a spare bin that is dropped, as bincount(...)[:E] did.
    counts = torch.zeros(E + 1, dtype=torch.long, device=expert_ids.device).scatter_add_(
        0, expert_ids.clamp(max=E), torch.ones_like(expert_ids))[:E]
    x_sorted = x[token_sorted]

    if plan.kernel == "grouped":
        # offsets stay on the device: no host sync for the grouping
        groups, project = torch.cumsum(counts, 0, dtype=torch.int32), _project_grouped
    else:
        groups, project = counts.tolist(), _project
    h = project(plan, gate_name, x_sorted, groups, expert_sorted, compute_dtype)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    out = project(plan, "down_proj", h, groups, expert_sorted, compute_dtype)
    if getattr(base, "has_post_expert_norm", False):
        out = base.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    result = torch.zeros(num_tokens, out.shape[-1], dtype=out.dtype, device=out.device)
    result = result.index_add(0, token_sorted, out)
    return result.to(hidden_states.dtype)


# --------------------------------------------------------------------------------------------------------------
# grouped kernel: torch._grouped_mm over the expert-sorted rows (forward and backward)

_GROUPED_DTYPES = ("float32", "bfloat16", "float16")
_PROBED: dict = {}  # (device, dtype) -> None if torch._grouped_mm runs there, else why not


def _grouped_mm_fn():
    import torch

    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _probe_grouped_mm(device, dtype) -> str | None:
    """Feature detection: one tiny aligned grouped_mm (with an empty group) on ``device``/``dtype``, cached."""
    import torch

    key = (str(device), dtype)
    if key not in _PROBED:
        x = torch.ones(4, 8, device=device, dtype=dtype)
        w = torch.ones(2, 8, 8, device=device, dtype=dtype)
        offs = torch.tensor([0, 4], device=device, dtype=torch.int32)
        try:
            out = _grouped_mm_fn()(x, w, offs=offs)
            _PROBED[key] = None if bool((out == 8).all()) else "grouped_mm gave a wrong result in the probe"
        except (RuntimeError, NotImplementedError) as exc:  # no kernel for this device/dtype/capability
            _PROBED[key] = f"torch grouped_mm unavailable on {device} {dtype}: {str(exc).splitlines()[0][:120]}"
    return _PROBED[key]


def _why_not_grouped(plan) -> str | None:
    """None when every grouped product of this plan can run through torch's grouped_mm kernel, else why not."""
    import torch

    if KERNEL == "loop":
        return "forced (shims.lora.fast_lora.KERNEL = 'loop')"
    if KERNEL != "auto":
        raise ValueError(f"shims.lora.fast_lora.KERNEL must be 'auto' or 'loop', not {KERNEL!r}")
    if _grouped_mm_fn() is None:
        return "this torch has no grouped_mm"
    base = plan.base
    gate_name = "gate_up_proj" if base.has_gate else "up_proj"
    param = quantized_parametrization(base, gate_name)
    dtype = param.settings.compute_dtype
    if dtype is None or str(dtype).removeprefix("torch.") not in _GROUPED_DTYPES:
        return f"compute dtype {dtype} (grouped kernel: {', '.join(_GROUPED_DTYPES)})"
    # the kernel wants 16-byte aligned row strides on every operand, forward and backward: the hidden, expert and
    # rank dims (static per layer) decide it
    dims = {d for name in (gate_name, "down_proj") for d in quantized_parametrization(base, name).logical_shape[1:]}
    dims |= {w.lora_A[plan.adapter].weight.shape[0] // w.num_experts for w in plan.wrappers.values()}
    item = torch.empty((), dtype=dtype).element_size()
    unaligned = sorted(d for d in dims if d * item % 16)
    if unaligned:
        return f"dims {unaligned} x {item} bytes not 16-byte aligned"
    return _probe_grouped_mm(base.parametrizations[gate_name].original.device, dtype)


def _as_grouped_weight(w):
    """``w`` (E, K, N) laid out as the kernel accepts: one of the two inner dims contiguous."""
    return w if w.stride(-1) == 1 or w.stride(-2) == 1 else w.contiguous()


def _aligned_rows(x):
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _gmm(x, w, offs):
    """Rows ``offs[e-1]:offs[e]`` of ``x`` (S, K) times ``w[e]`` (K, N) -> (S, N)."""
    return _grouped_mm_fn()(_aligned_rows(x), _as_grouped_weight(w), offs=offs)


def _gmm_weight_grad(x, grad, offs):
    """Per group ``x_e^T @ grad_e`` -> (E, K, N): the weight gradient of :func:`_gmm` (empty groups give zeros)."""
    return _grouped_mm_fn()(_aligned_rows(x).t(), _aligned_rows(grad), offs=offs)


def _grouped_classes():
    import torch

    class GroupedMatmul(torch.autograd.Function):
        """Differentiable :func:`_gmm` with a grouped backward (input and weight gradients)."""

        @staticmethod
        def forward(ctx, x, w, offs):
            ctx.save_for_backward(x, w, offs)
            return _gmm(x, w, offs)

        @staticmethod
        def backward(ctx, grad_out):
            x, w, offs = ctx.saved_tensors
            grad_x = _gmm(grad_out, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
            grad_w = _gmm_weight_grad(x, grad_out, offs) if ctx.needs_input_grad[1] else None
            return grad_x, grad_w, None

    class GroupedDequantMatmul(torch.autograd.Function):
        """x_sorted @ W_e^T (W_e when transposed) per group, W dequantized transiently in forward AND backward."""

        @staticmethod
        def forward(ctx, x_sorted, offs, base, name, transposed):
            ctx.save_for_backward(offs)
            ctx.base, ctx.name, ctx.transposed = base, name, transposed
            with torch.no_grad():
                weight = dequantize_param(base, name).to(x_sorted.dtype)
                _keep_if_recomputing(base, name, weight)
                return _gmm(x_sorted, weight if transposed else weight.transpose(-2, -1), offs)

        @staticmethod
        def backward(ctx, grad_out):
            if not ctx.needs_input_grad[0]:
                _take_recomputed(ctx.base, ctx.name)
                return None, None, None, None, None
            (offs,) = ctx.saved_tensors
            weight = _weight_for_backward(ctx, grad_out.dtype)
            grad = _gmm(grad_out, weight.transpose(-2, -1) if ctx.transposed else weight, offs)
            return grad, None, None, None, None

    return GroupedMatmul, GroupedDequantMatmul


@functools.cache
def _grouped():
    return _grouped_classes()  # built once, on first use (torch is imported lazily)


def _factor_stacks(wrapper, adapter: str, dtype):
    """(LHS (E, d1, r), RHS (E, r, d2), scaling): :func:`_factors` for all experts at once, as views/copies of A, B."""
    E = wrapper.num_experts
    A = wrapper.lora_A[adapter].weight.to(dtype)  # (E*r, in): expert e owns rows e*r:(e+1)*r
    B = wrapper.lora_B[adapter].weight.to(dtype)  # (out, E*r): expert e owns columns e::E
    r = A.shape[0] // E
    a = A.reshape(E, r, A.shape[1])  # a[e] = A_e (r, in)
    b = B.reshape(B.shape[0], r, E).permute(2, 0, 1)  # b[e] = B_e (out, r)
    if did_swap_in_out_features(wrapper):
        return b, a, wrapper.scaling[adapter]  # delta_e = B_e A_e
    return a.transpose(1, 2), b.transpose(1, 2), wrapper.scaling[adapter]  # delta_e = A_e^T B_e^T


def _grouped_lora_term(x_sorted, offs, wrapper, adapter, transposed: bool, dtype):
    """The loop's per-expert LoRA term as two grouped matmuls: (x @ lhs) @ rhs, or (x @ rhs^T) @ lhs^T."""
    matmul = _grouped()[0].apply
    lhs, rhs, s = _factor_stacks(wrapper, adapter, dtype)
    first, second = (lhs, rhs) if transposed else (rhs.transpose(1, 2), lhs.transpose(1, 2))
    first, second = _as_grouped_weight(first), _as_grouped_weight(second)
    return matmul(matmul(x_sorted, first, offs), second, offs) * s


def _project_grouped(plan, name, x_sorted, offs, expert_sorted, dtype):
    base = plan.base
    transposed = bool(base.is_transposed)
    out = _grouped()[1].apply(x_sorted, offs, base, name, transposed)
    if base.has_bias:
        out = out + getattr(base, f"{name}_bias")[expert_sorted].to(dtype)
    wrapper = plan.wrappers.get(name)
    if wrapper is not None:
        out = out + _grouped_lora_term(x_sorted, offs, wrapper, plan.adapter, transposed, dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# the patch


def _call_args(x, args, kwargs):
    """(hidden_states, top_k_index, top_k_weights) when the call is the experts interface call, else None."""
    if kwargs or len(args) != 2:
        return None
    top_k_index, top_k_weights = args
    if top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape or x.dim() != 2:
        return None
    return x, top_k_index, top_k_weights


def _install():
    from peft.tuners.lora.layer import ParamWrapper

    original_forward = ParamWrapper.forward

    def forward(self, x, *args, **kwargs):
        if _IN_PEFT_PATH.get():
            return original_forward(self, x, *args, **kwargs)  # an inner wrapper of a chain running peft's path
        plan = plan_of(self)
        call = _call_args(x, args, kwargs) if isinstance(plan, FastPlan) else None
        if call is None:
            reason = plan if isinstance(plan, str) else "unexpected call signature"
            log.debug("expert LoRA via peft (%s): %s", self.parameter_name, reason)
            token = _IN_PEFT_PATH.set(True)
            try:
                return original_forward(self, x, *args, **kwargs)
            finally:
                _IN_PEFT_PATH.reset(token)
        return routed_lora_forward(plan, *call)

    forward.__wrapped__ = original_forward
    forward.__doc__ = original_forward.__doc__
    # the refusals are reported while the patch is applied: forget them with it
    return chain_undo([_REFUSED.clear, swap_attr(ParamWrapper, "forward", forward)])


PATCHES: tuple = (
    Patch(
        name="fast_expert_lora",
        summary="expert LoRA on 4-bit experts computed from the routed tokens only (no W + delta for all experts; "
                "nothing float kept for backward); peft's path where the module is not understood",
        targets=(
            Target("peft.tuners.lora.layer", "ParamWrapper.forward", ("x",)),
            Target("peft.tuners.lora.layer", "ParamWrapper.get_delta_weight", ("adapter_name",)),
        ),
        # Reported, not required: peft 0.18.x has no such flag because it never swaps (did_swap_in_out_features).
        optional_targets=(SWAP_FLAG_TARGET,),
        needed=needs_4bit_expert_lora,
        install=_install,
        details=lambda: {"refused_experts_classes": refused_classes()},
    ),
)
