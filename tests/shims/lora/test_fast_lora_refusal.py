"""shims.lora.fast_lora refuses experts it does not understand (issue 23): ergo's ErgoExperts (transformers >= 5.25)
overrides the experts-implementation forward (one row per route, then a per-expert RMSNorm) and holds that norm.
Emulating the dispatch there is silently wrong (logits off by several units); refused, peft's path runs, equal to a
float model with plain peft. Every other tiny arch of the test suite stays on the fast path."""

import logging

import pytest

from conftest import _LX_EXTRA, q4_ids, q4_load, q4_reference, q4_requires_fused, saved_tiny, tiny_from_config
from tests.shims.quant.test_expert_families import CONFIGS as FAMILY_CONFIGS, _COMMON as FAMILY_COMMON

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "peft_quantized_experts", "peft_merge_quantized_experts", "fast_expert_lora")
IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
ERGO = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, first_dense_intermediate_size=48, num_dense_blocks=0, moe_intermediate_size=32,
            shared_intermediate_size=32, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
            initializer_range=0.2, sliding_window=16, global_attention_every_n_layers=2, tie_word_embeddings=False)
ERGO_TARGETS = dict(target_modules=["qkv_proj"], target_parameters=["mlp.experts.up_proj", "mlp.experts.down_proj"])
# ergo's decoder layer casts its hidden states to o_proj.weight.dtype: a 4-bit o_proj (uint8) cannot run, so it is kept
# float here; this file is about the experts
ERGO_SKIP = ["o_proj", "lm_head"]
OWN_FORWARD = "ErgoExperts defines its own forward over the experts-implementation dispatch"


@pytest.fixture(scope="module")
def ergo_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "ergo", **ERGO)


@pytest.fixture
def fast_shims():
    import shims
    from shims.lora import fast_lora

    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    yield status
    fast_lora.ENABLED = True
    shims.restore()


def _lora(model, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **ERGO_TARGETS))


def _logits(pm, ids):
    import torch

    with torch.no_grad():
        return pm(ids).logits


def _ergo_pair(path):
    """The 4-bit ergo with random LoRA, and the float model holding its dequantized weights with the same LoRA."""
    qmodel = q4_load(path, llm_int8_skip_modules=ERGO_SKIP)
    ref = q4_reference(qmodel, path)
    pq, pr = _lora(qmodel), _lora(ref, seed=2)
    lora = {k: v for k, v in pq.state_dict().items() if "lora_" in k}
    assert not pr.load_state_dict(lora, strict=False).unexpected_keys
    return pq, pr


def test_ergo_experts_run_peft_path_and_equal_plain_peft(ergo_checkpoint, fast_shims, caplog, monkeypatch):
    import torch

    import shims
    from shims.lora import fast_lora

    q4_requires_fused()
    caplog.set_level(logging.INFO, logger="shims")
    pq, pr = _ergo_pair(ergo_checkpoint)
    paths = fast_lora.expert_lora_paths(pq)
    assert len(paths) == 2 and all(p.startswith(f"peft: {OWN_FORWARD}") for p in paths.values()), paths
    details = {s["name"]: s for s in shims.status()}["fast_expert_lora"]["details"]
    assert list(details["refused_experts_classes"]) == ["transformers.models.ergo.modeling_ergo.ErgoExperts"]
    ids = q4_ids()
    for impl in IMPLEMENTATIONS:
        for model in (pq, pr):
            model.base_model.model.set_experts_implementation(impl)
        shimmed, plain = _logits(pq, ids), _logits(pr, ids)
        fast_lora.ENABLED = False
        disabled = _logits(pq, ids)
        fast_lora.ENABLED = True
        with pq.disable_adapter():
            off = _logits(pq, ids)
        assert torch.equal(shimmed, disabled), impl  # the refusal IS peft's path
        torch.testing.assert_close(shimmed, plain, rtol=0, atol=1e-5, msg=impl)  # == plain peft on float weights
        assert (shimmed - off).abs().max() > 1e-2  # the LoRA matters, so the match is meaningful
    refusals = [r for r in caplog.records if "ErgoExperts runs on peft's path" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO  # once, however many forwards

    # the native symptom: with the refusal off, the fast path replaces ErgoExperts' forward and is wrong
    monkeypatch.setattr(fast_lora, "why_not_understood", lambda base: None)
    assert all(p.startswith("fast (") for p in fast_lora.expert_lora_paths(pq).values())
    wrong = _logits(pq, ids)
    assert (wrong - plain).abs().max() > 0.5


def test_ergo_norm_alone_is_refused(ergo_checkpoint, fast_shims, monkeypatch):
    """Each check catches ergo by itself: without the forward check, its per-expert norm still refuses it."""
    from shims.lora import fast_lora

    q4_requires_fused()
    monkeypatch.setattr(fast_lora, "_forward_refusal", lambda cls: None)
    pq = _lora(q4_load(ergo_checkpoint, llm_int8_skip_modules=ERGO_SKIP))
    paths = set(fast_lora.expert_lora_paths(pq).values())
    assert paths == {"peft: ErgoExperts holds ['post_expert_norm'] beyond its expert stacks (e.g. a per-expert norm)"}


def test_unknown_tensor_on_experts_is_refused(q4_checkpoint, fast_shims):
    """A tensor the flags do not describe (here a per-expert scale added to qwen3_moe's experts) -> peft's path."""
    import torch

    from peft import LoraConfig, get_peft_model

    from shims.lora import fast_lora

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"))
    experts = model.model.layers[0].mlp.experts
    experts.register_buffer("expert_scale", torch.ones(experts.num_experts))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    paths = fast_lora.expert_lora_paths(pm)
    assert paths["base_model.model.model.layers.0.mlp.experts"] == (
        "peft: Qwen3MoeExperts holds ['expert_scale'] beyond its expert stacks (e.g. a per-expert norm)")
    assert paths["base_model.model.model.layers.1.mlp.experts"] == "fast (grouped)"


def _experts_modules(model):
    from shims.lora.fast_lora import _FLAGS

    return [(name, m) for name, m in model.named_modules() if all(hasattr(m, f) for f in _FLAGS)]


_LX_CONFIG = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2)
ARCHS = {**{t: {**_LX_CONFIG, **c} for t, c in _LX_EXTRA.items()},
         **{t: (c if t == "dbrx" else {**FAMILY_COMMON, **c}) for t, c in FAMILY_CONFIGS.items()}}


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_other_archs_experts_are_understood(model_type):
    """Every experts module of the suite's other tiny archs passes the refusal checks (float, from config)."""
    from shims.lora import fast_lora

    if not fast_lora._dispatch_code():
        pytest.skip("this transformers has no use_experts_implementation")
    model = tiny_from_config(model_type, **ARCHS[model_type])
    modules = _experts_modules(model)
    if not modules:  # dbrx, jetmoe, llama4_text: no flagged experts class, refused earlier by plan_of's flags check
        pytest.skip(f"this transformers' {model_type} has no experts-implementation class")
    refused = {name: fast_lora.why_not_understood(m) for name, m in modules}
    assert not any(refused.values()), refused


def test_ergo_experts_are_not_understood():
    from shims.lora import fast_lora

    model = tiny_from_config("ergo", **ERGO)
    reasons = {fast_lora.why_not_understood(m) for _, m in _experts_modules(model)}
    assert len(reasons) == 1 and reasons.pop().startswith(OWN_FORWARD)


@pytest.mark.parametrize("model_type", sorted(_LX_EXTRA))
def test_fast_path_engages_on_4bit_experts(model_type, q4_checkpoint, fast_shims):
    """The 4-bit tiny archs the suite trains keep the fast path on every layer (none is refused)."""
    from peft import LoraConfig, get_peft_model

    from shims.lora import fast_lora

    q4_requires_fused()
    model = q4_load(q4_checkpoint(model_type))
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False,
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    paths = fast_lora.expert_lora_paths(pm)
    assert len(paths) == model.config.num_hidden_layers
    assert all(p.startswith("fast (") for p in paths.values()), paths
    assert fast_lora.refused_classes() == {}
