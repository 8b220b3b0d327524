"""The QLoRA recipe users type (bf16/fp16 compute, prepare_model_for_kbit_training, gradient checkpointing) on
shim 4-bit experts and routers: float32 hidden states reaching a 4-bit tensor are cast in and out, as
bitsandbytes' Linear4bit does, in every experts implementation and on both expert-LoRA paths."""

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_requires_fused

pytestmark = pytest.mark.needs_ml

IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


@pytest.fixture
def all_shims():
    """Every patch (4-bit routers included), restored afterwards."""
    import shims

    shims.apply()
    yield shims
    shims.restore()
ROUTER_SKIP = {"gpt_oss": ["router"]}  # keeps the routers float; the others' router is "gate"


def _recipe_model(path, compute, float_routers: bool, model_type: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from shims.quant import quant_router

    dtype = getattr(torch, compute)
    skip = ROUTER_SKIP.get(model_type, ["gate"]) if float_routers else None
    model = q4_load(path, dtype=dtype, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                    **({"llm_int8_skip_modules": skip} if skip else {}))
    routers = quant_router.router_storage(model)  # before peft wraps the experts the routers sit beside
    assert routers["routers"] > 0 and routers["quantized"] == (0 if float_routers else routers["routers"])
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.train()  # transformers checkpoints layers only in training mode
    return peft_model


@pytest.mark.slow
@pytest.mark.parametrize("model_type", Q4_ARCHS)
@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
@pytest.mark.parametrize("float_routers", [False, True], ids=["routers4bit", "routersfloat"])
def test_recipe_trains_in_every_forward_path(model_type, compute, float_routers, q4_checkpoint, all_shims):
    import torch

    from shims.lora import fast_lora

    q4_requires_fused()
    model = _recipe_model(q4_checkpoint(model_type), compute, float_routers, model_type)
    ids = q4_ids()
    expert_lora = {n: p for n, p in model.named_parameters() if "experts" in n and "lora_" in n}
    assert expert_lora
    losses = []
    for impl in IMPLEMENTATIONS:
        for fast in (True, False):
            model.base_model.model.set_experts_implementation(impl)
            fast_lora.ENABLED = fast
            try:
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            finally:
                fast_lora.ENABLED = True
            assert torch.isfinite(loss), (impl, fast)
            no_grad = [n for n, p in expert_lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not no_grad, (impl, fast, no_grad)
            losses.append(float(loss))
    # same model, same batch: every path computes the same loss up to 16-bit rounding
    assert max(losses) - min(losses) < 0.05 * abs(losses[0]), losses


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_float32_hidden_states_cast_in_and_out_of_a_4bit_router(model_type, q4_checkpoint, all_shims):
    """Exactly what Linear4bit does: input to the dequantized dtype, output back to the input's dtype."""
    import torch

    from shims.quant import quant_router, storage

    q4_requires_fused()
    model = q4_load(q4_checkpoint(model_type), dtype=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)
    path, router = next(iter(quant_router.iter_routers(model)))
    bias = router._parameters.get("bias")
    if bias is not None:  # as prepare_model_for_kbit_training leaves it
        bias.data = bias.data.float()
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = router(x)
        want = router(x.to(torch.bfloat16))  # what the router computes in its compute dtype
        assert storage.dequantize_param(router, "weight").dtype == torch.bfloat16
    got, want = (o if isinstance(o, tuple) else (o,) for o in (got, want))
    floats = [(g, w) for g, w in zip(got, want) if g.is_floating_point()]
    assert floats and all(g.dtype == torch.float32 for g, _ in floats), path  # cast back to the caller's dtype
    for g, w in zip(got, want):  # the same computation: indices identical, logits / scores up to bf16 rounding
        if g.is_floating_point():  # (a router may round its scores to the dtype it was called with)
            torch.testing.assert_close(g, w.float(), rtol=8e-3, atol=8e-3, msg=path)
        else:
            assert torch.equal(g, w), path
    if bias is not None:  # the stored parameter keeps its dtype; the cast copy is gone after the forward
        assert router.bias.dtype == torch.float32 and "bias" not in router.__dict__


def test_float32_hidden_states_reach_4bit_experts_with_float32_biases(q4_checkpoint, all_shims):
    """gpt_oss experts add float biases (float32 after prepare_model_for_kbit_training) in eager, batched_mm and
    grouped_mm: the output equals the bf16 forward (bf16 hidden states and biases), cast back to float32."""
    import torch

    q4_requires_fused()
    model = q4_load(q4_checkpoint("gpt_oss"), dtype=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    tokens, top_k = 6, model.config.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, model.config.hidden_size, generator=g)
    indices = torch.stack([torch.randperm(model.config.num_local_experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            want = experts(x.to(torch.bfloat16), indices, weights)
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                experts._parameters[name].data = experts._parameters[name].data.float()
            got = experts(x, indices, weights)
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                assert experts._parameters[name].dtype == torch.float32 and name not in experts.__dict__
                experts._parameters[name].data = experts._parameters[name].data.to(torch.bfloat16)
        assert got.dtype == torch.float32, impl
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0, msg=impl)


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_gradient_checkpointing_keeps_lora_gradients_exact(model_type, q4_checkpoint, all_shims):
    """fp32 compute: the LoRA gradients of one step are identical with and without checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model

    q4_requires_fused()
    model = q4_load(q4_checkpoint(model_type))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                                             init_lora_weights=False))
    model.train()
    ids = q4_ids()
    grads = []
    for checkpointing in (True, False):
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.base_model.model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("experts" in n for n in grads[0])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
