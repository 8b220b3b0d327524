"""4-bit fused experts through transformers 4.x's loader (gpt_oss on 4.57): run in the 4.57 test lane."""

import pytest

from conftest import lx_build_tiny_moe, q4_ids, q4_load


def _requires_legacy_loader():
    pytest.importorskip("bitsandbytes")
    from shims.loader_generation import V4, transformers_loader

    if transformers_loader() != V4:
        pytest.skip("transformers 5.x loads through core_model_loading (tests/shims/quant/test_quant.py covers it)")


@pytest.fixture
def legacy_shims():
    import shims

    _requires_legacy_loader()
    shims.apply(only=["quantize_fused_experts_v4"])
    yield shims
    shims.restore()


@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory):
    import torch

    _requires_legacy_loader()
    path = tmp_path_factory.mktemp("legacy_gpt_oss")
    lx_build_tiny_moe("gpt_oss", dtype=torch.float32).save_pretrained(path)
    return str(path)


def _dequantized_reference(qmodel, path):
    """The float model holding exactly the dequantized weights of ``qmodel`` (Linear4bit and experts)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import storage

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                ref.get_submodule(name).weight.copy_(BF.dequantize_4bit(module.weight.data, module.weight.quant_state))
            elif storage.is_quantized_experts(module):
                for pname in storage.expert_weight_names(module):
                    getattr(ref.get_submodule(name), pname).copy_(storage.dequantize_param(module, pname))
    return ref


@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_experts_quantized_at_load_and_exact(legacy_shims, gpt_oss_checkpoint, double_quant):
    import torch

    from shims.quant import storage

    model = q4_load(gpt_oss_checkpoint, bnb_4bit_use_double_quant=double_quant)
    counts = storage.expert_storage(model)
    assert counts["quantized"] == counts["expert_tensors"] == 2 * model.config.num_hidden_layers
    if not double_quant:  # on tensors this small the nested state's fixed tables outweigh what it saves
        assert counts["bytes"] <= 0.29 * counts["bf16_bytes"]
    experts = model.model.layers[0].mlp.experts
    assert storage.quantized_parametrization(experts, "gate_up_proj").quant_state.nested == double_quant
    assert experts.gate_up_proj_bias.dtype == torch.float32  # biases stay float
    reference = _dequantized_reference(model, gpt_oss_checkpoint)
    with torch.no_grad():
        assert torch.equal(model(q4_ids()).logits, reference(q4_ids()).logits)


def test_per_expert_linear_models_are_left_to_bitsandbytes(legacy_shims, tmp_path):
    import bitsandbytes as bnb
    import torch

    from shims.quant import storage

    lx_build_tiny_moe("qwen3_moe", dtype=torch.float32).save_pretrained(tmp_path)
    model = q4_load(str(tmp_path))
    assert storage.expert_storage(model)["expert_tensors"] == 0
    assert isinstance(model.model.layers[0].mlp.experts[0].gate_proj, bnb.nn.Linear4bit)


def test_prequantized_checkpoint_round_trips_bit_exact(legacy_shims, gpt_oss_checkpoint, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import storage

    model = q4_load(gpt_oss_checkpoint, bnb_4bit_use_double_quant=True)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert storage.expert_storage(again)["quantized"] == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(again(q4_ids()).logits, model(q4_ids()).logits)


def test_packed_experts_without_their_state_are_refused(legacy_shims, gpt_oss_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from shims.quant.storage import ExpertQuantError

    q4_load(gpt_oss_checkpoint).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    dropped = "model.layers.0.mlp.experts.down_proj.absmax"
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ExpertQuantError, match=r"model\.layers\.0\.mlp\.experts\.down_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_float_quant_storage_round_trips_or_is_refused(legacy_shims, gpt_oss_checkpoint, tmp_path):
    """Packed bytes stored in a float dtype must never be taken for float weights (and re-quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import storage

    model = q4_load(gpt_oss_checkpoint, bnb_4bit_quant_storage=torch.float32)
    model.save_pretrained(tmp_path)
    try:
        again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    except storage.ExpertQuantError as exc:
        assert "quant_storage" in str(exc)
        return
    assert storage.expert_storage(again)["quantized"] == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(again(q4_ids()).logits, model(q4_ids()).logits)
