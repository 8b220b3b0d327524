"""save_merged reads the live PeftModel and must leave it as it was: with a float32 base the expert stack it merges
is the model's own parameter, so an in-place sum on it would write W + delta into the model being exported (the
merge that follows, or the next export, then adds the delta twice)."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from shims.merging import export  # noqa: E402

from conftest import lx_fused_experts  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_leaves_the_live_model_unchanged(tiny_moe, lora_targets, dtype, tmp_path):
    if not lx_fused_experts():
        pytest.skip("transformers 4.x: per-expert Linear experts go through peft's own Linear delta")
    modules, params = lora_targets("qwen3_moe")
    torch.manual_seed(5)
    model = peft.get_peft_model(tiny_moe("qwen3_moe", dtype=dtype), peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=modules, target_parameters=params, init_lora_weights=False)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        logits = model(ids).logits
    export.save_merged(model, tmp_path / "merged", dtype=torch.float32, tokenizer=False)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed == []
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
