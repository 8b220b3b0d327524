"""A 4-bit checkpoint whose experts the user kept float (``llm_int8_skip_modules``) reloads with the shims.

transformers 5.x saves float fused experts per expert (``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``). The
4.x-checkpoint patch (``per_expert_4bit_checkpoint``) puts a twin converter before each fusing converter; for float
per-expert tensors it runs the model's own ops, which find their inputs by the model's source patterns. It passed
the twin's own pattern spellings instead, so Concatenate (gate, up -> gate_up_proj) found nothing: the reload raised
"torch.cat(): expected a non-empty list of Tensors" (measured: qwen3_moe with ``["experts", "lm_head"]`` skipped,
and longcat_flash, whose experts were float because they were not recognised)."""

import pytest

from conftest import q4_ids, q4_load, q4_requires_fused

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "quantize_moe_routers", "prequantized_experts_checkpoint",
          "per_expert_4bit_checkpoint")


@pytest.fixture
def checkpoint_shims():
    import shims

    q4_requires_fused()
    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    assert status["per_expert_4bit_checkpoint"]["applied"], status["per_expert_4bit_checkpoint"]
    yield
    shims.restore()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_float_experts_of_a_4bit_checkpoint_reload(model_type, q4_checkpoint, checkpoint_shims, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from cases.measure import expert_storage, keep_bnb_compute_dtype

    model = q4_load(q4_checkpoint(model_type), llm_int8_skip_modules=["experts", "lm_head"])
    assert expert_storage(model)["quantized"] == 0 < expert_storage(model)["expert_tensors"]
    keep_bnb_compute_dtype(model)
    ids = q4_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    keep_bnb_compute_dtype(reloaded)
    assert expert_storage(reloaded)["quantized"] == 0
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, before)
