"""routing_weights_dtype: transformers 4.x deepseek_v3 / glm4_moe moe() under bf16 autocast with Linear4bit experts."""

import pytest

from conftest import lx_fused_experts

pytestmark = pytest.mark.needs_ml


def test_detects_the_accumulator_pattern():
    from shims.compat.moe_routing_dtype import accumulates_in_routing_dtype

    def breaks(self, hidden_states, topk_indices, topk_weights):
        out = hidden_states.new_zeros(1).zeros_like(hidden_states, dtype=topk_weights.dtype)
        out.index_add_(0, topk_indices, hidden_states)
        return out

    def fine(self, hidden_states, topk_indices, topk_weights):
        out = hidden_states.new_zeros(1).zeros_like(hidden_states)
        out.index_add_(0, topk_indices, hidden_states)
        return out

    assert accumulates_in_routing_dtype(breaks)
    assert not accumulates_in_routing_dtype(fine)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_recipe_step_under_bf16_autocast(model_type, tmp_path):
    """The QLoRA recipe's first step (prepare_model_for_kbit_training + bf16 autocast) fails natively on 4.57 and
    runs with the patch; on 5.x the patch says why it is not needed."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import shims
    from conftest import lx_build_tiny_moe, q4_ids

    if lx_fused_experts():
        try:
            status = {s["name"]: s for s in shims.apply(only=["routing_weights_dtype"])}["routing_weights_dtype"]
        finally:
            shims.restore()
        assert not status["applied"] and "fused experts" in status["reason"], status
        return
    lx_build_tiny_moe(model_type, dtype=torch.bfloat16).save_pretrained(tmp_path)

    def step():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj", "gate_proj", "down_proj"]))
        model.train()
        ids = q4_ids()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="index_add_"):
        step()
    shims.apply(only=["routing_weights_dtype"])
    try:
        assert torch.isfinite(step())
    finally:
        shims.restore()
