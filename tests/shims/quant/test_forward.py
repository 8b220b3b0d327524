"""4-bit experts forward == the same model with dequantized float weights, for every experts implementation."""

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_reference, q4_requires_fused

pytestmark = pytest.mark.needs_ml

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_forward_matches_dequantized_reference(model_type, q4_checkpoint, q4_shims):
    import torch
    import torch.nn.utils.parametrize as P

    q4_requires_fused()
    path = q4_checkpoint(model_type)
    model = q4_load(path)
    ref = q4_reference(model, path)
    ids = q4_ids()
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        ref.set_experts_implementation(impl)
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{model_type} {impl}")
        assert P._cache_enabled == 0 and P._cache == {}  # dequantized copies dropped after the forward


def test_dequantized_once_per_experts_forward(q4_checkpoint, q4_shims):
    """eager indexes gate_up_proj[e] per expert; the per-forward cache dequantizes each tensor once."""
    import torch

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"))
    model.set_experts_implementation("eager")
    calls = []
    cls = storage.parametrization_class()
    original = cls.forward
    cls.forward = lambda self, packed: calls.append(self.owner) or original(self, packed)
    try:
        with torch.no_grad():
            model(q4_ids())
    finally:
        cls.forward = original
    assert sorted(calls) == sorted(f"model.layers.{i}.mlp.experts.{n}" for i in range(2)
                                   for n in ("gate_up_proj", "down_proj"))


def test_no_persistent_float_expert_copy(q4_checkpoint, q4_shims):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"))
    with torch.no_grad():
        model(q4_ids())
    for _, module in storage.iter_expert_modules(model):
        stored = list(module.parameters()) + list(module.buffers())
        assert not any(t.is_floating_point() and t.dim() == 3 for t in stored)


def test_bf16_model_with_fp32_compute_runs_every_implementation(q4_checkpoint, q4_shims):
    import torch

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"), dtype=torch.bfloat16, bnb_4bit_compute_dtype=torch.float32)
    outs = {}
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            outs[impl] = model(q4_ids()).logits
        assert outs[impl].dtype == torch.bfloat16 and torch.isfinite(outs[impl]).all()
    torch.testing.assert_close(outs["eager"], outs["grouped_mm"], rtol=0, atol=0.05)
