"""shims.quant.quant_router: MoE routers stored 4-bit on transformers 5.x, as 4.x's Linear4bit routers were."""

import os

import pytest

from conftest import (Q4_ARCHS, lx_build_tiny_moe, lx_fused_experts, q4_ids, q4_load, q4_reference, q4_requires_fused,
                      q4_warmup_sizes)

pytestmark = pytest.mark.needs_ml

ROUTER_ARCHS = Q4_ARCHS + ("deepseek_v3",)  # qwen3_moe/mixtral `gate`, gpt_oss `router` (+bias), deepseek fp32 `gate`
_SHIMS = ("quantize_fused_experts", "quantize_moe_routers", "prequantized_experts_checkpoint")


@pytest.fixture
def router_shims():
    import shims

    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    yield status
    shims.restore()


@pytest.fixture(scope="module")
def router_checkpoint(tmp_path_factory):
    cache = {}

    def checkpoint(model_type):
        if model_type not in cache:
            import torch

            path = tmp_path_factory.mktemp(f"router_{model_type}")
            lx_build_tiny_moe(model_type, dtype=torch.float32).save_pretrained(path)
            cache[model_type] = str(path)
        return cache[model_type]

    return checkpoint


def _router_weights(model) -> dict:
    """path -> (stored tensor, logical float weight) for every router of ``model``."""
    from shims.quant import quant_router, storage

    out = {}
    for path, module in quant_router.iter_routers(model):
        stored = storage.raw_tensor(module, "weight")
        out[path] = (stored, module.weight.detach())
    return out


@pytest.mark.parametrize("model_type", ROUTER_ARCHS)
def test_routers_are_4bit_and_forward_equals_the_dequantized_model(model_type, router_checkpoint, router_shims):
    import bitsandbytes.functional as BF
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import quant_router

    q4_requires_fused()
    assert router_shims["quantize_moe_routers"]["applied"], router_shims["quantize_moe_routers"]
    path = router_checkpoint(model_type)
    model = q4_load(path)
    routers = _router_weights(model)
    assert len(routers) == model.config.num_hidden_layers
    assert quant_router.router_storage(model)["quantized"] == len(routers)
    native = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, (stored, logical) in routers.items():
        assert stored.dtype == torch.uint8 and stored.numel() * 2 == logical.numel(), name
        original = native.get_submodule(name).weight.detach()
        want = BF.dequantize_4bit(*BF.quantize_4bit(original, quant_type="nf4"))  # bitsandbytes' own round trip
        assert torch.equal(logical, want), name
    ids = q4_ids()
    with torch.no_grad():
        got, ref = model(ids).logits, q4_reference(model, path)(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_bf16_router_dequantizes_to_bf16(router_checkpoint, router_shims):
    """Routers multiply without casting their input: a bf16 model's router must come back bf16 (not the fp32
    compute dtype)."""
    import torch

    q4_requires_fused()
    model = q4_load(router_checkpoint("qwen3_moe"), dtype=torch.bfloat16)
    routers = _router_weights(model)
    assert routers and all(s.dtype == torch.uint8 and w.dtype == torch.bfloat16 for s, w in routers.values())
    with torch.no_grad():
        assert torch.isfinite(model(q4_ids()).logits).all()


@pytest.mark.parametrize("model_type", ("deepseek_v3", "glm4_moe"))
def test_router_kept_wider_than_the_model_stays_float(model_type, router_checkpoint, router_shims):
    """Newer transformers (5.24, not 5.6) keep deepseek_v3 / glm4_moe routers in float32 in a bf16 model (routing
    precision chosen by the model): left float, as 4.x left it, and counted as such. Where the plain load gives a
    bf16 router, and in a float32 model, the router has the model's dtype and is 4-bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import quant_router

    q4_requires_fused()
    path = router_checkpoint(model_type)
    native = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = q4_load(path, dtype=torch.bfloat16)
    routers = _router_weights(model)
    wide = {name: native.get_submodule(name).weight.dtype == torch.float32 for name in routers}
    assert routers
    for name, (stored, _) in routers.items():
        assert stored.dtype == (torch.float32 if wide[name] else torch.uint8), name
    counts = quant_router.router_storage(model)
    assert counts["kept_wide"] == sum(wide.values()) and counts["quantized"] == len(routers) - sum(wide.values())
    with torch.no_grad():
        assert torch.isfinite(model(q4_ids()).logits).all()
    assert quant_router.router_storage(q4_load(router_checkpoint(model_type)))["quantized"] == len(routers)


def test_skip_modules_keep_routers_float_and_experts_4bit(router_checkpoint, router_shims):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    model = q4_load(router_checkpoint("qwen3_moe"), llm_int8_skip_modules=["gate", "lm_head"])
    for name, (stored, _) in _router_weights(model).items():
        assert stored.dtype == torch.float32, name
    counts = storage.expert_storage(model)
    assert counts["quantized"] == counts["expert_tensors"] > 0  # "gate" must not match experts.gate_up_proj


def test_saved_like_linear4bit_and_reloaded_exactly(router_checkpoint, router_shims, tmp_path):
    import torch
    from safetensors import safe_open

    q4_requires_fused()
    model = q4_load(router_checkpoint("mixtral"), bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
    ids = q4_ids()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.get_tensor("model.layers.0.mlp.gate.weight").dtype == torch.uint8
    assert {"model.layers.0.mlp.gate.weight.absmax", "model.layers.0.mlp.gate.weight.nested_absmax",
            "model.layers.0.mlp.gate.weight.quant_state.bitsandbytes__fp4"} <= keys
    reloaded = q4_load(tmp_path)
    for name, (stored, _) in _router_weights(reloaded).items():
        assert stored.dtype == torch.uint8 and not hasattr(reloaded.get_submodule(name), "quant_state"), name
        assert torch.equal(stored, _router_weights(model)[name][0]), name
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, before)


def test_float_routers_of_a_prequantized_checkpoint_stay_float(router_checkpoint, tmp_path):
    """A 4-bit checkpoint saved with float routers (shims 0.2, or routers skipped) is loaded as saved."""
    import torch

    import shims

    q4_requires_fused()
    shims.apply(only=("quantize_fused_experts", "prequantized_experts_checkpoint"))
    try:
        model = q4_load(router_checkpoint("qwen3_moe"))
        model.save_pretrained(tmp_path)
        with torch.no_grad():
            before = model(q4_ids()).logits
    finally:
        shims.restore()
    shims.apply(only=_SHIMS)
    try:
        reloaded = q4_load(tmp_path)
        assert all(s.dtype == torch.float32 for s, _ in _router_weights(reloaded).values())
        with torch.no_grad():
            assert torch.equal(reloaded(q4_ids()).logits, before)
    finally:
        shims.restore()


def test_gpu_warmup_counts_routers_as_4bit(router_checkpoint, router_shims):
    q4_requires_fused()
    model, sizes = q4_warmup_sizes(router_checkpoint("qwen3_moe"))
    routers = [n for n in sizes if n.endswith("mlp.gate.weight")]
    assert len(routers) == model.config.num_hidden_layers
    assert all(sizes[n] == 0.5 for n in routers)
    assert sizes["model.embed_tokens.weight"] == 2 and sizes["model.norm.weight"] == 2


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_export_writes_the_dequantized_router(storage, router_checkpoint, router_shims, tmp_path):
    """Also with a float quant_storage, where the packed router bytes are float tensors of another shape."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    import shims

    q4_requires_fused()
    shims.apply()
    model = q4_load(router_checkpoint("qwen3_moe"), bnb_4bit_quant_storage=getattr(torch, storage))
    routers = {name: logical.clone() for name, (_, logical) in _router_weights(model).items()}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    shims.save_merged(peft_model, tmp_path / "out", dtype=torch.float32, tokenizer=False)
    with safe_open(os.path.join(tmp_path, "out", "model.safetensors"), "pt") as fh:
        for name, want in routers.items():
            assert torch.equal(fh.get_tensor(f"{name}.weight"), want), name


def test_not_needed_on_transformers_4():
    import shims

    if lx_fused_experts():
        pytest.skip("transformers 5.x: the patch is needed here")
    status = {s["name"]: s for s in shims.apply()}["quantize_moe_routers"]
    shims.restore()
    assert not status["applied"] and "nn.Linear" in status["reason"], status


def test_restore_leaves_routers_float(router_checkpoint):
    import torch

    import shims

    q4_requires_fused()
    assert {s["name"]: s for s in shims.apply()}["quantize_moe_routers"]["applied"]
    shims.apply()  # twice: a no-op
    shims.restore()
    model = q4_load(router_checkpoint("qwen3_moe"))
    assert all(s.dtype == torch.float32 for s, _ in _router_weights(model).values())
