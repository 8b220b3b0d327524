"""The e2e measurement of the fast expert-LoRA path against peft's own path (cases.pipeline.fast_vs_peft, stage
fast_path) and its verdict rule fast_path_equals_peft (harness/verdict.py) on real 4-bit tiny models: the rule holds
on the shims as they are, on both kernels, and goes red when the fast path slices lora_B wrongly (the mutation
fast_lora_contiguous_lora_b of cases/mutations.py); on ergo, whose experts the fast path refuses, both runs are
peft's path and the logits are identical (S = 0)."""

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_requires_fused, saved_tiny

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "peft_quantized_experts", "peft_merge_quantized_experts", "fast_expert_lora")
KERNELS = ("auto", "loop")  # torch._grouped_mm where it runs, and the per-expert loop (each has its own factors code)


@pytest.fixture
def fast_shims():
    import shims
    from shims.lora import fast_lora

    shims.apply(only=_SHIMS)
    yield
    fast_lora.ENABLED = True
    fast_lora.KERNEL = "auto"
    shims.restore()


def _rule():
    from harness import verdict

    return next(r for r in verdict.RULES if r.name == "fast_path_equals_peft")


def _judged(metrics: dict) -> tuple[bool, bool]:
    case = {"stages": {"fast_path": {"status": "ok"}}, "metrics": metrics}
    rule = _rule()
    return rule.applies(case), rule.holds(case)


def _batch():
    import torch

    ids = q4_ids(batch=3, length=12)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # a left-padded row: its padding positions are not compared
    return {"input_ids": ids, "attention_mask": mask}


def _lora(model, target_parameters, target_modules=("q_proj", "v_proj")):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                                            target_parameters=target_parameters, init_lora_weights=False))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_rule_holds_on_the_fast_path_and_breaks_with_a_misplaced_lora_b(model_type, kernel, q4_checkpoint,
                                                                        fast_shims, monkeypatch):
    from cases.mutations import MUTATIONS
    from cases.pipeline import fast_vs_peft
    from harness import verdict
    from shims.lora import fast_lora

    q4_requires_fused()
    fast_lora.KERNEL = kernel
    pm = _lora(q4_load(q4_checkpoint(model_type)), ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    batch = _batch()
    m = fast_vs_peft(pm, batch)
    assert m["fast_path_modules"] == m["fast_path_experts"] == m["fast_path_calls"] == 2, m  # both layers, once
    assert m["fast_path_calls_disabled"] == 0 and m["fast_path_refused"] == []
    # S per layer: E + gated gate_up 2 x 2 (H + r + 3) + down 2 (I + r + 3), H = 64, I = 24, r = 4, E = 4 (gpt_oss's
    # transposed stacks are read along their other axis: the same widths)
    assert m["fast_path_summands"] == 2 * (4 + 4 * (64 + 4 + 3) + 2 * (24 + 4 + 3))
    assert verdict.fast_path_bound(m) == 2.0 ** -24 * m["fast_path_summands"] * m["fast_vs_peft_logit_max"]
    assert _judged(m) == (True, True), m

    # the fast path's lora_B sliced contiguously: restored by monkeypatch after the test
    monkeypatch.setattr(fast_lora, "_factors", fast_lora._factors)
    monkeypatch.setattr(fast_lora, "_factor_stacks", fast_lora._factor_stacks)
    MUTATIONS["fast_lora_contiguous_lora_b"]()
    broken = fast_vs_peft(pm, batch)
    assert broken["fast_path_calls"] == 2
    assert _judged(broken) == (True, False)
    assert broken["fast_vs_peft_max_abs"] > 100 * verdict.fast_path_bound(broken), broken  # far outside, not marginal


def test_rule_fails_where_the_fast_path_did_not_run(q4_checkpoint, fast_shims, monkeypatch):
    """A fast path that silently stayed off compares peft's path with itself (d == 0): the call count catches it."""
    from cases.pipeline import fast_vs_peft
    from shims.lora import fast_lora

    q4_requires_fused()
    pm = _lora(q4_load(q4_checkpoint("qwen3_moe")), ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    # the patch stays installed and plan_of accepts every chain, but each call is "not understood": peft's path runs
    monkeypatch.setattr(fast_lora, "_call_args", lambda x, args, kwargs: None)
    m = fast_vs_peft(pm, _batch())
    assert m["fast_vs_peft_max_abs"] == 0.0 and m["fast_path_experts"] == 2 and m["fast_path_calls"] == 0
    assert _judged(m) == (True, False)


ERGO = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, first_dense_intermediate_size=48, num_dense_blocks=0, moe_intermediate_size=32,
            shared_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
            initializer_range=0.2, sliding_window=16, global_attention_every_n_layers=2, tie_word_embeddings=False)


def test_refused_experts_give_identical_logits_and_a_zero_bound(tmp_path_factory, fast_shims):
    """ergo (transformers >= 5.25): the fast path refuses ErgoExperts, so both runs are peft's path: S = 0, d == 0."""
    from cases.pipeline import fast_vs_peft
    from harness import verdict

    q4_requires_fused()
    path = saved_tiny(tmp_path_factory, "ergo", **ERGO)  # skips where this transformers has no ergo
    # ergo's decoder layer casts to o_proj.weight.dtype (uint8 under Linear4bit without branch_dtype_4bit): float o_proj
    model = q4_load(path, llm_int8_skip_modules=["o_proj", "lm_head"])
    pm = _lora(model, ["mlp.experts.up_proj", "mlp.experts.down_proj"], target_modules=["qkv_proj"])
    m = fast_vs_peft(pm, _batch())
    assert m["fast_path_modules"] == 2 and m["fast_path_experts"] == 0 and m["fast_path_calls"] == 0
    assert m["fast_path_summands"] == 0 and verdict.fast_path_bound(m) == 0.0
    assert any("ErgoExperts defines its own forward" in r for r in m["fast_path_refused"]), m["fast_path_refused"]
    assert m["fast_vs_peft_max_abs"] == 0.0
    assert _judged(m) == (True, True)
    assert _judged({**m, "fast_vs_peft_max_abs": 1e-9}) == (True, False)  # S = 0: any difference is red
