"""adapter_layout_on_load: PeftModel.from_pretrained of a 4.57 per-expert adapter into fused 5.x experts loads what
was trained. Natively, peft 0.18 loads no expert LoRA from it (checked here); peft >= 0.19 converts it itself, which
gets this module's adapters right but real 4.57-saved ones wrong (KL 0.7-1.6: the e2e stage foreign_adapters, which
loads the adapters the 4.57 lanes published, shows it natively)."""

from __future__ import annotations

import pytest

from conftest import lx_build_tiny_moe, lx_fused_experts

pytestmark = pytest.mark.needs_ml

_OTHERS = ("quantize_fused_experts", "peft_quantized_experts", "weight_converter_kwargs", "adapter_model_keys")


def _trained(model_type, tmp_path):
    """(base dir, fused adapter dir, logits of the PeftModel that saved it)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = lx_build_tiny_moe(model_type, dtype=torch.float32)
    base = tmp_path / "base"
    model.save_pretrained(base)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                          init_lora_weights=False))
    adapter = tmp_path / "fused"
    pm.save_pretrained(adapter)
    with torch.no_grad():
        return base, adapter, pm(_ids()).logits


def _ids():
    import torch

    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _load(base_dir, adapter_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    with torch.no_grad():
        return model(_ids()).logits


def _peft_converts_v4_adapters() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft.utils.transformers_weight_conversion") is not None


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_per_expert_adapter_loads_what_was_trained(model_type, tmp_path):
    import torch

    import shims

    if not lx_fused_experts():
        pytest.skip("transformers 4.x: no fused experts to convert to")
    base, fused, trained = _trained(model_type, tmp_path)
    moved_dir = tmp_path / "per_expert"
    shims.convert_adapter(fused, moved_dir, to="per_expert", base_config=base)

    shims.apply(only=_OTHERS)
    try:
        native = _load(base, moved_dir)
    except TypeError as exc:  # peft 0.19 + transformers >= 5.6 build converters with keywords 5.6 dropped
        native = exc
    finally:
        shims.restore()
    status = {s["name"]: s for s in shims.apply(only=_OTHERS + ("adapter_layout_on_load",))}
    try:
        assert status["adapter_layout_on_load"]["applied"], status["adapter_layout_on_load"]
        fixed = _load(base, moved_dir)
    finally:
        shims.restore()
    torch.testing.assert_close(fixed, trained, rtol=0, atol=1e-5)
    if not _peft_converts_v4_adapters():  # the symptom the patch removes: a silent load without the expert LoRA
        assert isinstance(native, torch.Tensor) and (native - trained).abs().max() > 1e-5  # fails the check above


def test_adapter_in_the_expected_layout_goes_to_peft_unchanged(tmp_path):
    import torch

    import shims
    from shims.adapters.adapter_load import conversion_for

    if not lx_fused_experts():
        pytest.skip("transformers 4.x: no fused experts")
    base, fused, trained = _trained("qwen3_moe", tmp_path)
    assert conversion_for(fused, lx_build_tiny_moe("qwen3_moe", dtype=torch.float32)) is None
    shims.apply(only=_OTHERS + ("adapter_layout_on_load",))
    try:
        torch.testing.assert_close(_load(base, fused), trained, rtol=0, atol=1e-5)
    finally:
        shims.restore()
