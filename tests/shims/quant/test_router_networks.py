"""Routers that are a small network, found by structure (shims.quant.quant_router._router_linears).

zaya's router (``mlp.gate``) is ``down_proj`` then ``router_mlp.fc1`` / ``fc2`` / ``out_proj``; ``out_proj`` scores
the 4 experts + 1 skip expert (5 rows, as many as the router's ``balancing_biases``). Every layer is an nn.Linear,
so bitsandbytes stores it as its own Linear4bit; before, no router was found at all (``routers_4bit``: 0 routers),
so a float router network could not have been told from a 4-bit one."""

import pytest

from conftest import q4_load, q4_requires_fused, saved_tiny

pytestmark = pytest.mark.needs_ml

ZAYA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False,
            moe_intermediate_size=24, num_experts=4, num_experts_per_tok=1, sliding_window=16,
            layer_types=["hybrid", "hybrid"], router_hidden_size=32)
NETWORK = ("down_proj", "router_mlp.fc1", "router_mlp.fc2", "router_mlp.out_proj")


@pytest.fixture(scope="module")
def zaya_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "zaya", **ZAYA)


@pytest.fixture
def router_shims():
    import shims

    q4_requires_fused()
    shims.apply(only=("quantize_fused_experts", "quantize_moe_routers"))
    yield
    shims.restore()


def _expected(prefix="model.layers"):
    return {f"{prefix}.{i}.mlp.gate.{p}" for i in range(ZAYA["num_hidden_layers"]) for p in NETWORK}


def test_every_layer_of_zayas_router_network_is_found_and_4bit(zaya_checkpoint, router_shims):
    from bitsandbytes.nn import Linear4bit

    from shims.quant import quant_router

    model = q4_load(zaya_checkpoint)
    found = dict(quant_router.iter_routers(model))
    assert set(found) == _expected()
    assert all(isinstance(m, Linear4bit) for m in found.values())
    counts = quant_router.router_storage(model)
    assert counts["routers"] == counts["quantized"] == len(found)


def test_a_float_router_network_is_counted_float(zaya_checkpoint, router_shims):
    """Kept float (the network's layers in llm_int8_skip_modules): found, and not counted 4-bit."""
    from shims.quant import quant_router

    model = q4_load(zaya_checkpoint, llm_int8_skip_modules=["down_proj", "fc1", "fc2", "out_proj", "lm_head"])
    assert set(dict(quant_router.iter_routers(model))) == _expected()
    counts = quant_router.router_storage(model)
    assert counts["routers"] == len(_expected()) and counts["quantized"] == 0


def test_an_mlp_beside_the_experts_is_no_router():
    """The output layer must score the expert classes: a shared-expert MLP (gate/up -> down, back to the hidden
    size) next to the experts is not a router, nor is a network whose last layer has more rows than any per-class
    statistic it holds."""
    import torch

    from shims.quant.quant_router import _router_linears

    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (torch.nn.Linear(64, 32), torch.nn.Linear(64, 32),
                                                 torch.nn.Linear(32, 64))
    assert _router_linears(mlp, {4}) == []
    net = torch.nn.Module()
    net.fc1, net.out = torch.nn.Linear(64, 16), torch.nn.Linear(16, 5)
    assert _router_linears(net, {4}) == []  # 5 rows, no statistic of 5: not a router
    net.bias_per_class = torch.nn.Buffer(torch.zeros(5))
    assert _router_linears(net, {4}) == ["fc1", "out"]
    assert _router_linears(net, {5}) == ["fc1", "out"]
