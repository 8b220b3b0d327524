"""shims.quant.checkpoint: save_pretrained / from_pretrained of a model with 4-bit experts (pre-quantized checkpoint)."""

import os

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_requires_fused

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "prequantized_experts_checkpoint")


@pytest.fixture
def ckpt_shims():
    import shims

    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    yield status
    shims.restore()


def _reload(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _keys(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def _rewrite(path, drop):
    """Rewrite the saved file without the keys ``drop`` selects (atomically, as a damaged checkpoint)."""
    from safetensors.torch import save_file

    tensors = {k: v for k, v in _keys(path).items() if not drop(k)}
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_save_reload_is_exact_and_stays_4bit(model_type, q4_checkpoint, ckpt_shims, tmp_path):
    import bitsandbytes.functional as BF
    import torch

    from shims.quant import storage

    q4_requires_fused()
    assert ckpt_shims["prequantized_experts_checkpoint"]["applied"]
    model = q4_load(q4_checkpoint(model_type))
    model.save_pretrained(tmp_path)
    saved = _keys(tmp_path)
    prefix = "model.layers.0.mlp.experts.gate_up_proj"
    assert saved[prefix].dtype == torch.uint8
    assert {f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.quant_state.bitsandbytes__nf4"} <= set(saved)
    assert not any("parametrizations" in k for k in saved)

    # loading must neither quantize nor dequantize-for-storage: count bitsandbytes' quantize calls
    calls = []
    original = BF.quantize_4bit
    BF.quantize_4bit = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        reloaded = _reload(tmp_path)
    finally:
        BF.quantize_4bit = original
    assert calls == []

    counts = storage.expert_storage(reloaded)
    assert counts == storage.expert_storage(model)
    assert counts["quantized"] == counts["expert_tensors"] == 2 * model.config.num_hidden_layers
    for (name, module), (_, ref_module) in zip(storage.iter_expert_modules(reloaded), storage.iter_expert_modules(model)):
        assert not any(p.is_floating_point() and p.dim() == 3 for p in module.parameters())
        for pname in storage.expert_weight_names(module):
            assert torch.equal(module.parametrizations[pname].original, ref_module.parametrizations[pname].original)
            assert torch.equal(storage.dequantize_param(module, pname), storage.dequantize_param(ref_module, pname))
    ids = q4_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_double_quant_fp4_round_trip(q4_checkpoint, ckpt_shims, tmp_path):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"), bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
    model.save_pretrained(tmp_path)
    saved = _keys(tmp_path)
    prefix = "model.layers.1.mlp.experts.down_proj"
    assert {f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map", f"{prefix}.quant_state.bitsandbytes__fp4"} <= set(saved)
    reloaded = _reload(tmp_path)
    param = storage.quantized_parametrization(reloaded.model.layers[1].mlp.experts, "down_proj")
    assert param.quant_state.quant_type == "fp4" and param.quant_state.nested
    assert storage.expert_storage(reloaded)["quantized"] == 4
    ids = q4_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("damage", ["all_state", "absmax_only", "packed_only"])
def test_incomplete_checkpoint_raises_naming_the_tensor(damage, q4_checkpoint, ckpt_shims, tmp_path):
    from shims.quant import storage

    q4_requires_fused()
    q4_load(q4_checkpoint("qwen3_moe")).save_pretrained(tmp_path)
    target = "model.layers.1.mlp.experts.gate_up_proj"
    drop = {
        "all_state": lambda k: k.startswith(target + "."),
        "absmax_only": lambda k: k == target + ".absmax",
        "packed_only": lambda k: k == target,
    }[damage]
    _rewrite(tmp_path, drop)
    with pytest.raises(storage.ExpertQuantError, match=rf"{target.replace('.', r'[.]')}"):
        _reload(tmp_path)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_reloaded_model_saves_again(model_type, q4_checkpoint, ckpt_shims, tmp_path):
    """save -> load -> save -> load: the second save of a pre-quantized model is byte-identical in its experts."""
    import torch

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint(model_type))
    model.save_pretrained(tmp_path / "a")
    _reload(tmp_path / "a").save_pretrained(tmp_path / "b")
    first, second = _keys(tmp_path / "a"), _keys(tmp_path / "b")
    expert_keys = {k for k in first if ".experts." in k}
    assert expert_keys and expert_keys <= set(second)
    assert all(torch.equal(first[k], second[k]) for k in expert_keys)
    again = _reload(tmp_path / "b")
    assert storage.expert_storage(again)["quantized"] == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(again(q4_ids()).logits, model(q4_ids()).logits)


def test_not_needed_without_fused_experts():
    import shims
    from shims.loader_generation import V5, transformers_loader

    if transformers_loader() == V5:
        pytest.skip("fused experts exist here; the 4.x behaviour is checked on transformers 4.57")
    try:
        result = {s["name"]: s for s in shims.apply(only=["prequantized_experts_checkpoint"])}
    finally:
        shims.restore()
    assert not result["prequantized_experts_checkpoint"]["applied"]
    assert result["prequantized_experts_checkpoint"]["reason"].startswith("not needed: transformers")


def test_float_quant_storage_is_exact_or_refused(q4_checkpoint, ckpt_shims, tmp_path):
    """bf16 quant_storage: exact when the loader keeps the bytes; where it casts them (5.5/5.6 load the un-renamed
    float key in the model dtype) the load is refused naming the tensor, never silently different."""
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint("qwen3_moe"), bnb_4bit_quant_storage=torch.bfloat16)
    model.save_pretrained(tmp_path)
    ids = q4_ids()
    with torch.no_grad():
        want = model(ids).logits
    same_dtype = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    param = storage.quantized_parametrization(same_dtype.model.layers[0].mlp.experts, "down_proj")
    assert param.settings.quant_storage == torch.bfloat16
    for (_, a), (_, b) in zip(storage.iter_expert_modules(model), storage.iter_expert_modules(same_dtype)):
        for name in ("gate_up_proj", "down_proj"):
            # compare bytes: packed bytes viewed as bf16 include NaN patterns (NaN != NaN)
            assert torch.equal(a.parametrizations[name].original.view(torch.uint8),
                               b.parametrizations[name].original.view(torch.uint8))
    try:
        cast = _reload(tmp_path)
    except storage.ExpertQuantError as exc:
        assert "model.layers." in str(exc) and "loader cast it" in str(exc)
    else:
        with torch.no_grad():
            assert torch.equal(cast(ids).logits, want)
