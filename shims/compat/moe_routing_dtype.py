"""routing_weights_dtype: deepseek_v3 / glm4_moe MoE blocks on transformers 4.x under the QLoRA recipe.

transformers 4.x runs these blocks' experts one by one in ``moe(hidden_states, topk_indices, topk_weights)``,
accumulating into ``zeros_like(hidden_states, dtype=topk_weights.dtype)`` with ``index_add_``. Under bf16 mixed
precision (the recipe: trl/accelerate autocast) the router's ``F.linear`` yields bf16 routing weights, while
bitsandbytes' ``Linear4bit`` experts ignore autocast and return their input's dtype: float32 after
``prepare_model_for_kbit_training``. ``index_add_`` then refuses (bf16 accumulator, float32 source) and training
stops at the first step, with or without the other shims.

The patch runs ``moe`` with the routing weights in the hidden states' dtype, the dtype the block returns anyway
(``final_hidden_states.type(hidden_states.dtype)``), so the accumulation and the experts agree. Where the dtypes
already agree nothing changes. Needed where an MoE class has such a ``moe`` method (read from its source);
transformers 5.x routes through fused experts modules and has none.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap

from ..registry import Patch, Target, chain_undo, present_holders, swap_attr

log = logging.getLogger("shims")

# (module, class) of the MoE blocks with a per-expert ``moe`` loop on transformers 4.x
_BLOCKS = (
    ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    ("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeMoE"),
)
TARGETS = tuple(Target(module, f"{cls}.moe") for module, cls in _BLOCKS)


def accumulates_in_routing_dtype(moe_fn) -> bool:
    """True when ``moe_fn`` builds its accumulator as ``zeros_like(..., dtype=<routing weights>.dtype)`` and adds
    expert outputs with ``index_add_`` (the pattern that breaks when the two dtypes differ)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(moe_fn)))
    except (OSError, TypeError):
        return False
    routing = list(inspect.signature(moe_fn).parameters)[-1]
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    zeros_in_routing_dtype = any(
        c.func.attr == "zeros_like" and any(
            kw.arg == "dtype" and isinstance(kw.value, ast.Attribute) and kw.value.attr == "dtype"
            and isinstance(kw.value.value, ast.Name) and kw.value.value.id == routing for kw in c.keywords)
        for c in calls)
    return zeros_in_routing_dtype and any(c.func.attr == "index_add_" for c in calls)


def _affected_blocks() -> list:
    return [cls for _, cls in present_holders(TARGETS) if accumulates_in_routing_dtype(cls.moe)]


def _needed() -> str | None:
    if not _affected_blocks():
        return "no MoE block accumulates expert outputs in the routing weights' dtype (transformers 5.x: fused experts)"
    return None


def _install():
    undos = []
    for cls in _affected_blocks():
        original = cls.moe

        @functools.wraps(original)
        def moe_in_hidden_dtype(self, hidden_states, topk_indices, topk_weights, _original=original):
            if topk_weights.dtype != hidden_states.dtype and hidden_states.is_floating_point():
                topk_weights = topk_weights.to(hidden_states.dtype)
            return _original(self, hidden_states, topk_indices, topk_weights)

        moe_in_hidden_dtype.__shims_patched__ = True
        undos.append(swap_attr(cls, "moe", moe_in_hidden_dtype))
        log.debug("shims: %s.moe runs with routing weights in the hidden states' dtype", cls.__name__)
    return chain_undo(undos)


PATCHES = (
    Patch(
        name="routing_weights_dtype",
        summary="deepseek_v3 / glm4_moe moe() on transformers 4.x: routing weights in the hidden states' dtype, so "
                "bf16 autocast + Linear4bit experts (the QLoRA recipe) do not fail in index_add_",
        targets=(),
        # Optional: transformers 5.x has no per-expert moe() loop; needed() says so.
        optional_targets=TARGETS,
        needed=_needed,
        install=_install,
    ),
)
