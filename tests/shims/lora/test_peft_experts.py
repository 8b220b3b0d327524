"""peft target_parameters LoRA on 4-bit experts: attached, exact vs the float reference, trains."""

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_lora_pair, q4_reference, q4_requires_fused

pytestmark = pytest.mark.needs_ml


def _expert_wrappers(model):
    from peft.tuners.lora.layer import ParamWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, ParamWrapper)]


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_lora_attaches_and_matches_float_reference(model_type, q4_checkpoint, q4_shims):
    import torch

    q4_requires_fused()
    path = q4_checkpoint(model_type)
    qmodel = q4_load(path)
    pq, pr = q4_lora_pair(qmodel, q4_reference(qmodel, path))
    wrappers = _expert_wrappers(pq)
    assert len(wrappers) == 2 * qmodel.config.num_hidden_layers
    # same nesting and adapter keys as on the unquantized model
    assert {k for k in pq.state_dict() if "lora_" in k} == {k for k in pr.state_dict() if "lora_" in k}
    E = qmodel.config.num_local_experts if hasattr(qmodel.config, "num_local_experts") else qmodel.config.num_experts
    for _, w in wrappers:
        assert w.num_experts == E and w.get_param().dtype == torch.float32  # logical 3D shape, compute dtype
    ids = q4_ids()
    for impl in ("grouped_mm", "batched_mm", "eager"):
        qmodel.set_experts_implementation(impl)
        pr.base_model.model.set_experts_implementation(impl)
        with torch.no_grad():
            got, want, base = pq(ids).logits, pr(ids).logits, qmodel(ids).logits
            with pq.disable_adapter():
                off = pq(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=impl)
        assert (got - off).abs().max() > 1e-5  # the adapter matters: without it the check above would fail
    for _, w in wrappers:  # peft's per-forward LoRA parametrization is gone, ours stays
        plist = w.get_base_layer().parametrizations[w.parameter_name]
        assert len(plist) == 1


def test_expert_lora_trains(q4_checkpoint, q4_shims):
    import torch
    from peft import LoraConfig, get_peft_model

    q4_requires_fused()
    qmodel = q4_load(q4_checkpoint("qwen3_moe"))
    torch.manual_seed(0)
    pq = get_peft_model(qmodel, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    expert_lora = {n: p for n, p in pq.named_parameters() if "experts" in n and "lora_" in n}
    assert len(expert_lora) == 8 and all(p.requires_grad for p in expert_lora.values())
    before = {n: p.detach().clone() for n, p in expert_lora.items()}
    opt = torch.optim.AdamW([p for p in pq.parameters() if p.requires_grad], lr=1e-2)
    ids = q4_ids()
    losses, got_grad = [], set()
    for _ in range(4):
        loss = pq(input_ids=ids, labels=ids).loss
        loss.backward()
        got_grad |= {n for n, p in expert_lora.items() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert got_grad == set(expert_lora)  # lora_A and lora_B of gate_up and down, every layer
    assert all(not torch.equal(before[n], p) for n, p in expert_lora.items())
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.uint8 for n, p in pq.named_parameters() if n.endswith("original"))


def test_without_the_patch_peft_attaches_no_expert_lora(q4_checkpoint):
    """Documents the upstream behaviour the patch fixes (silently no LoRA on parametrized experts)."""
    import shims
    from peft import LoraConfig, get_peft_model

    q4_requires_fused()
    shims.apply(only=["quantize_fused_experts"])
    try:
        qmodel = q4_load(q4_checkpoint("qwen3_moe"))
        pq = get_peft_model(qmodel, LoraConfig(r=4, target_modules=["q_proj"],
                                               target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        assert _expert_wrappers(pq) == []
    finally:
        shims.restore()


@pytest.mark.parametrize("quantized", [True, False], ids=["4bit", "float"])
def test_a_target_parameter_peft_skips_is_an_error_naming_it(quantized, q4_checkpoint, q4_shims, monkeypatch):
    """peft has skipped matching expert tensors without a word; with the shims that is an error naming them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.model import LoraModel
    from transformers import AutoModelForCausalLM

    from shims.lora.peft_experts import LoraTargetDropped

    q4_requires_fused()
    path = q4_checkpoint("qwen3_moe")
    model = q4_load(path) if quantized else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    original = LoraModel._create_and_replace

    def skip_down_proj(self, *args, **kwargs):
        if kwargs.get("parameter_name") == "down_proj":
            return None  # the silent drop
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_create_and_replace", skip_down_proj)
    config = LoraConfig(r=2, target_modules=["q_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with pytest.raises(LoraTargetDropped, match=r"layers\.0\.mlp\.experts\.down_proj"):
        get_peft_model(model, config)


def test_every_matched_target_parameter_gets_lora(q4_checkpoint, q4_shims):
    from peft import LoraConfig, get_peft_model

    from shims.lora.peft_experts import dropped_lora_targets

    q4_requires_fused()
    pm = get_peft_model(q4_load(q4_checkpoint("mixtral")), LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    assert dropped_lora_targets(pm.base_model.model, pm.peft_config["default"], "default") == []
