"""Fast expert LoRA on 4-bit experts: the LoRA term from the routed tokens only.

peft's ``ParamWrapper`` runs an experts module with LoRA by registering ``W + delta`` as a parametrization of the
expert tensor, i.e. it materialises the full (E, d1, d2) delta AND W + delta for ALL experts on every forward (and
autograd keeps them until backward). On a real MoE that dominates train peak memory and time.

When shims are applied, the OUTERMOST ``ParamWrapper`` of a chain whose base is a shim-quantized experts module runs
:func:`routed_lora_forward` instead (if :func:`plan_of` accepts the chain, otherwise peft's own path):

- tokens are grouped by expert (only experts that received tokens do any work);
- the base projection uses the layer's dequantized expert stack, dequantized transiently inside an autograd
  function that keeps NOTHING float for backward: backward dequantizes again (as bitsandbytes' 4-bit matmul does);
- the LoRA term per expert e is ``scaling * (x_e @ rhs_e^T) @ lhs_e^T`` (``x_e @ lhs_e @ rhs_e`` for transposed
  experts), with ``delta_e = lhs_e @ rhs_e`` exactly peft's ``ParamWrapper.get_delta_weight`` convention: A rows
  ``e*r:(e+1)*r``, B columns ``e::E``; ``_did_swap_in_out_features`` decides which factor is on which side.
- the expert math (gate/up split and activation via the module's own ``_apply_gate`` / ``act_fn``, biases,
  optional post-expert norm, routing weights) is read from the flags transformers 5.x sets on every experts class
  (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``), so it REPLACES whichever experts
  implementation (grouped_mm, batched_mm, eager) the config selects, for wrapped 4-bit experts only.

Fallback rule (documented, logged at debug, inspectable with :func:`path_of`): peft's path is used whenever the chain
is not understood: experts not 4-bit, several or no active adapters, merged or disabled adapters, expert parallelism,
an unknown tensor name or call signature, missing experts flags, or ``ENABLED = False``.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
from dataclasses import dataclass, field

from .registry import Patch, Target, swap_attr

log = logging.getLogger("shims")

ENABLED = True  # runtime switch (e.g. to compare both paths in one process); the registry patch installs the hook
FAST = "fast"
_IN_PEFT_PATH = contextvars.ContextVar("shims_fast_lora_in_peft_path", default=False)
_FLAGS = ("has_gate", "has_bias", "is_transposed", "num_experts")


@dataclass
class FastPlan:
    base: object  # the experts module
    adapter: str
    wrappers: dict = field(default_factory=dict)  # tensor name -> ParamWrapper


def _chain(wrapper):
    from peft.tuners.lora.layer import ParamWrapper

    wrappers, module = [], wrapper
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module.base_layer
    return wrappers, module


def plan_of(wrapper) -> FastPlan | str:
    """A FastPlan when the fast path can run ``wrapper`` (an outermost ParamWrapper), else the reason why not."""
    from .quant import dequantize_param, quantized_parametrization  # noqa: F401

    if not ENABLED:
        return "fast path disabled (shims.fast_lora.ENABLED = False)"
    wrappers, base = _chain(wrapper)
    if not wrappers:
        return "not a peft ParamWrapper"
    missing = [f for f in _FLAGS if not hasattr(base, f)]
    if missing:
        return f"experts module {type(base).__name__} lacks {missing} (not a transformers 5.x experts class)"
    if getattr(base, "_is_expert_parallel", False):
        return "expert parallelism"
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
    return plan


def path_of(module) -> str:
    """``"fast"`` or ``"peft: <reason>"``: which path the ParamWrapper ``module`` (outermost of its chain) uses."""
    plan = plan_of(module)
    return FAST if isinstance(plan, FastPlan) else f"peft: {plan}"


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
    if getattr(wrapper, "_did_swap_in_out_features", False):
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


def _routed_matmul_class():
    import torch

    class RoutedDequantMatmul(torch.autograd.Function):
        """Per expert x_e @ W_e^T (or x_e @ W_e when transposed) with W dequantized transiently, also in backward."""

        @staticmethod
        def forward(ctx, x_sorted, counts, base, name, transposed):
            from .quant import dequantize_param

            ctx.counts, ctx.base, ctx.name, ctx.transposed = counts, base, name, transposed
            with torch.no_grad():
                weight = dequantize_param(base, name).to(x_sorted.dtype)
                parts = [x_e @ (weight[e] if transposed else weight[e].t())
                         for e, x_e in enumerate(x_sorted.split(counts)) if counts[e]]
            out_dim = weight.shape[2] if transposed else weight.shape[1]
            del weight
            return torch.cat(parts) if parts else x_sorted.new_zeros(0, out_dim)

        @staticmethod
        def backward(ctx, grad_out):
            from .quant import dequantize_param

            if not ctx.needs_input_grad[0]:
                return None, None, None, None, None
            weight = dequantize_param(ctx.base, ctx.name).to(grad_out.dtype)
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

    from .quant import quantized_parametrization

    base = plan.base
    E = base.num_experts
    gate_name = "gate_up_proj" if base.has_gate else "up_proj"
    compute_dtype = quantized_parametrization(base, gate_name).settings.compute_dtype or hidden_states.dtype
    x = hidden_states.to(compute_dtype)
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    expert_sorted, order = torch.sort(expert_ids, stable=True)
    token_sorted = order // top_k
    counts = torch.bincount(expert_ids, minlength=E)[:E].tolist()
    x_sorted = x[token_sorted]

    h = _project(plan, gate_name, x_sorted, counts, expert_sorted, compute_dtype)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    out = _project(plan, "down_proj", h, counts, expert_sorted, compute_dtype)
    if getattr(base, "has_post_expert_norm", False):
        out = base.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    result = torch.zeros(num_tokens, out.shape[-1], dtype=out.dtype, device=out.device)
    result = result.index_add(0, token_sorted, out)
    return result.to(hidden_states.dtype)


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


def _needed() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed: no 4-bit experts"
    try:
        from peft.tuners.lora.layer import ParamWrapper  # noqa: F401
    except ImportError:
        return "this peft has no ParamWrapper"
    from .quant import _has_fused_experts

    if not _has_fused_experts():
        return "transformers has no fused 3D experts here"
    return None


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
    return swap_attr(ParamWrapper, "forward", forward)


PATCHES: tuple = (
    Patch(
        name="fast_expert_lora",
        summary="expert LoRA on 4-bit experts computed from the routed tokens only (no W + delta for all experts; "
                "nothing float kept for backward); peft's path where the module is not understood",
        targets=(
            Target("peft.tuners.lora.layer", "ParamWrapper.forward", ("x",)),
            Target("peft.tuners.lora.layer", "ParamWrapper.get_delta_weight", ("adapter_name",)),
        ),
        needed=_needed,
        install=_install,
    ),
)
