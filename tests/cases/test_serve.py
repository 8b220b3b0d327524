"""The serving stages' comparisons (cases/serve.py) on synthetic engine buffers: what counts as the engine loading
peft's expert LoRA, ignoring it or holding something else. The engine itself runs in `nox -s serve`."""

import pytest
import torch

from cases import serve

E, I, H, R, SCALING = 4, 6, 8, 3, 0.125


def _factors(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {role: (torch.randn(E, out, R, generator=g), torch.randn(E, R, inp, generator=g))
            for role, (out, inp) in {"w1": (I, H), "w3": (I, H), "w2": (H, I)}.items()}


def _reference(factors) -> dict:
    """peft's per-expert deltas: scaling * (B @ A), multiplied in float32."""
    return {0: {role: SCALING * (b @ a) for role, (b, a) in factors.items()}}


def _buffers(factors, adapter="fused", packed=False, interleaved=False) -> dict:
    """What the engine keeps: the scaling folded into B, gate/up held apart (2D) or packed into one factor (3D)."""
    prefix = f"{adapter}/model.layers.0.mlp.experts"
    (b1, a1), (b3, a3), (b2, a2) = factors["w1"], factors["w3"], factors["w2"]
    out = {f"{prefix}.w2_lora_a.0": a2, f"{prefix}.w2_lora_b.0": SCALING * b2}
    if not packed:
        out.update({f"{prefix}.w13_lora_a.0": a1, f"{prefix}.w13_lora_b.0": SCALING * b1,
                    f"{prefix}.w13_lora_a.1": a3, f"{prefix}.w13_lora_b.1": SCALING * b3})
        return out
    # one gate_up LoRA: A = [A_gate; A_up] (2r, H), B = blockdiag(B_gate, B_up) (2I, 2r)
    a = torch.cat([a1, a3], dim=1)
    b = torch.zeros(E, 2 * I, 2 * R)
    rows_gate, rows_up = (slice(0, 2 * I, 2), slice(1, 2 * I, 2)) if interleaved else (slice(0, I), slice(I, 2 * I))
    b[:, rows_gate, :R], b[:, rows_up, R:] = b1, b3
    out.update({f"{prefix}.w13_lora_a.0": a, f"{prefix}.w13_lora_b.0": SCALING * b})
    return out


def test_the_engine_holding_peft_factors_loads_exactly():
    factors = _factors(0)
    outcome, details = serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(_buffers(factors), "fused"))
    assert outcome == serve.LOADS and details["checked"] == 3


@pytest.mark.parametrize("interleaved", [False, True])
def test_a_packed_gate_up_factor_is_split_as_the_engine_packs_it(interleaved):
    factors = _factors(1)
    buffers = _buffers(factors, packed=True, interleaved=interleaved)
    right = serve.engine_expert_deltas(buffers, "fused", interleaved=interleaved)
    wrong = serve.engine_expert_deltas(buffers, "fused", interleaved=not interleaved)
    assert serve.compare_adapter(_reference(factors), right)[0] == serve.LOADS
    assert serve.compare_adapter(_reference(factors), wrong)[0] == serve.WRONG


def test_experts_swapped_in_the_engine_are_wrong():
    factors = _factors(2)
    buffers = _buffers(factors)
    key = "fused/model.layers.0.mlp.experts.w2_lora_b.0"
    buffers[key] = buffers[key][[1, 0, 2, 3]]
    assert serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(buffers, "fused"))[0] == serve.WRONG


def test_one_expert_delta_off_by_more_than_rounding_is_wrong():
    factors = _factors(3)
    buffers = _buffers(factors)
    key = "fused/model.layers.0.mlp.experts.w13_lora_b.1"
    buffers[key] = buffers[key].clone()
    buffers[key][2, 0, 0] *= 1 + 1e-4  # far above fp32 rounding of a rank-3 product, far below a layout mistake
    assert serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(buffers, "fused"))[0] == serve.WRONG


def test_all_zero_buffers_are_silently_ignored_and_other_adapters_are_not_read():
    factors = _factors(4)
    zero = {k: torch.zeros_like(v) for k, v in _buffers(factors).items()}
    both = {**zero, **_buffers(factors, adapter="per_expert")}
    assert serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(both, "fused"))[0] == serve.IGNORED
    assert serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(both, "per_expert"))[0] == serve.LOADS


def test_a_layer_the_engine_has_no_buffer_for_is_wrong():
    factors = _factors(5)
    reference = {**_reference(factors), 1: _reference(factors)[0]}
    outcome, details = serve.compare_adapter(reference, serve.engine_expert_deltas(_buffers(factors), "fused"))
    assert outcome == serve.WRONG and "layer 1" in details["missing"]


@pytest.mark.parametrize("default,mixed,outcome", [
    (serve.LOADS, serve.LOADS, serve.LOADS),
    (serve.REFUSED, serve.LOADS, serve.WITH_OPTION),
    (serve.REFUSED, serve.REFUSED, serve.REFUSED),
    (serve.IGNORED, serve.IGNORED, serve.IGNORED),
    (serve.REFUSED, serve.IGNORED, serve.IGNORED),
    (serve.WRONG, serve.LOADS, serve.WRONG),
])
def test_one_outcome_from_the_two_engine_configurations(default, mixed, outcome):
    assert serve.measured_outcome(default, mixed) == outcome


def test_log_probability_comparisons():
    a = [torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), -1)]
    assert serve.mean_kl(a, a) == 0.0 and serve.max_abs(a, a) == 0.0
    b = [torch.log_softmax(torch.tensor([[1.0, 2.0, 3.5]], dtype=torch.float64), -1)]
    assert serve.mean_kl(a, b) > 0 and serve.max_abs(a, b) > 0


def test_non_finite_engine_factors_are_wrong_not_loaded():
    factors = _factors(6)
    buffers = _buffers(factors)
    key = "fused/model.layers.0.mlp.experts.w2_lora_b.0"
    buffers[key] = buffers[key].clone()
    buffers[key][0, 0, 0] = float("nan")
    outcome, details = serve.compare_adapter(_reference(factors), serve.engine_expert_deltas(buffers, "fused"))
    assert outcome == serve.WRONG and "not_finite" in details
