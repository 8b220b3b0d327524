"""quantize_moe_routers leaves float32 a router the model declares float32 (``_keep_in_fp32_modules_strict``) in a
half-precision load, whatever the embeddings' dtype: ergo (transformers >= 5.25) keeps ``mlp.gate.linear.weight`` AND
its embeddings float32, so comparing the router's width with the embeddings' (the deepseek_v3 / glm4_moe rule) saw
nothing wider and stored it 4-bit. In a float32 load nothing is kept (transformers applies the declaration to
float16 / bfloat16 only): the router has the model's dtype and is stored 4-bit, as every other router."""

import pytest

from conftest import q4_load, q4_requires_fused, saved_tiny
from tests.shims.lora.test_fast_lora_refusal import ERGO, ERGO_SKIP

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "quantize_moe_routers")


@pytest.fixture(scope="module")
def ergo_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "ergo", **ERGO)


@pytest.fixture
def router_shims():
    import shims

    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    yield status
    shims.restore()


def _load(path, dtype):
    import torch

    dtype = getattr(torch, dtype)
    return q4_load(path, dtype=dtype, bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=ERGO_SKIP)


def _routers(model):
    return [model.model.layers[i].mlp.gate.linear for i in range(model.config.num_hidden_layers)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_strict_fp32_router_stays_float32(dtype, ergo_checkpoint, router_shims):
    import torch

    from shims.quant import quant_router, storage

    q4_requires_fused()
    assert router_shims["quantize_moe_routers"]["applied"]
    model = _load(ergo_checkpoint, dtype)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # ergo keeps these float32 too
    for router in _routers(model):
        assert storage.quantized_parametrization(router, "weight") is None
        assert router.weight.dtype == torch.float32
    assert quant_router.router_storage(model) == dict(routers=2, quantized=0, kept_wide=2, bytes=2 * 4 * 64 * 4)
    experts = model.model.layers[0].mlp.experts
    assert all(storage.quantized_parametrization(experts, n) for n in ("up_proj", "down_proj"))  # still 4-bit


def test_float32_load_stores_the_router_4bit(ergo_checkpoint, router_shims):
    from shims.quant import quant_router

    q4_requires_fused()
    model = _load(ergo_checkpoint, "float32")
    assert quant_router.router_storage(model)["quantized"] == 2


def test_without_the_declaration_the_router_is_quantized(ergo_checkpoint, router_shims, monkeypatch):
    """The check can fail: ignoring _keep_in_fp32_modules_strict, ergo's routers are stored 4-bit (the earlier rule)."""
    from shims.quant import quant_router, storage

    q4_requires_fused()
    monkeypatch.setattr(quant_router, "declared_fp32_strict", lambda model, path: False)
    model = _load(ergo_checkpoint, "bfloat16")
    assert all(storage.quantized_parametrization(r, "weight") is not None for r in _routers(model))
    assert quant_router.router_storage(model)["quantized"] == 2


def test_declaration_is_matched_as_transformers_matches_it():
    from types import SimpleNamespace

    from shims.quant.quant_router import declared_fp32_strict

    model = SimpleNamespace(_keep_in_fp32_modules_strict={"mlp.gate.linear.weight", "layers.*.router"})
    assert declared_fp32_strict(model, "model.layers.3.mlp.gate.linear")
    assert declared_fp32_strict(model, "model.layers.0.block.router")
    assert not declared_fp32_strict(model, "model.layers.0.mlp.gate")
    assert not declared_fp32_strict(SimpleNamespace(), "model.layers.0.mlp.gate")
