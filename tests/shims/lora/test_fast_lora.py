"""shims.lora.fast_lora: routed expert LoRA on 4-bit experts == peft's ParamWrapper path (logits and gradients)."""

import pytest

from conftest import Q4_ARCHS, q4_ids, q4_load, q4_requires_fused

pytestmark = pytest.mark.needs_ml

_SHIMS = ("quantize_fused_experts", "peft_quantized_experts", "peft_merge_quantized_experts", "fast_expert_lora")
IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
# the fast path's two kernels: "auto" takes torch._grouped_mm (torch 2.13 has CPU fp32 kernels and the tiny models'
# dims are 16-byte aligned in fp32), "loop" forces the per-expert Python loop
KERNELS = {"auto": "fast (grouped)", "loop": "fast (loop: forced (shims.lora.fast_lora.KERNEL = 'loop'))"}


@pytest.fixture
def fast_shims():
    import shims
    from shims.lora import fast_lora

    status = {s["name"]: s for s in shims.apply(only=_SHIMS)}
    yield status
    fast_lora.ENABLED = True
    fast_lora.KERNEL = "auto"
    shims.restore()


def _peft(model, seed=1, adapter_name="default", r=4):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(
        r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), adapter_name=adapter_name)


def _step(pm, ids):
    """Logits, every parameter gradient and the input-embedding gradient of one loss.backward()."""
    pm.zero_grad()
    embeds = pm.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = pm(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, embeds.grad.detach().clone()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_fast_path_equals_peft_path(model_type, kernel, q4_checkpoint, fast_shims, monkeypatch):
    _assert_fast_equals_peft(model_type, kernel, KERNELS[kernel], q4_checkpoint, fast_shims, monkeypatch)


def test_unaligned_rank_falls_back_to_loop_and_stays_exact(q4_checkpoint, fast_shims, monkeypatch):
    """r=3 in fp32: 12-byte rows the grouped kernel refuses -> the loop, chosen automatically, equal to peft's path."""
    _assert_fast_equals_peft("qwen3_moe", "auto", "fast (loop: dims [3] x 4 bytes not 16-byte aligned)",
                             q4_checkpoint, fast_shims, monkeypatch, r=3)


def _assert_fast_equals_peft(model_type, kernel, expected_path, q4_checkpoint, fast_shims, monkeypatch, r=4):
    import torch

    from shims.lora import fast_lora

    q4_requires_fused()
    assert fast_shims["fast_expert_lora"]["applied"]
    fast_lora.KERNEL = kernel
    model = q4_load(q4_checkpoint(model_type))
    pm = _peft(model, r=r)
    paths = fast_lora.expert_lora_paths(pm)
    assert len(paths) == model.config.num_hidden_layers and set(paths.values()) == {expected_path}
    calls = []
    routed = fast_lora.routed_lora_forward
    monkeypatch.setattr(fast_lora, "routed_lora_forward", lambda *a: calls.append(1) or routed(*a))
    ids = q4_ids()
    for impl in IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        calls.clear()
        fast_logits, fast_grads, fast_input = _step(pm, ids)
        assert len(calls) == model.config.num_hidden_layers  # the fast path really ran, once per layer
        fast_lora.ENABLED = False
        try:
            calls.clear()
            ref_logits, ref_grads, ref_input = _step(pm, ids)
            assert calls == []
            with pm.disable_adapter(), torch.no_grad():
                off = pm(ids).logits
        finally:
            fast_lora.ENABLED = True
        torch.testing.assert_close(fast_logits, ref_logits, rtol=0, atol=1e-5, msg=f"{model_type} {impl}")
        assert (ref_logits - off).abs().max() > 1e-5  # the expert LoRA matters: without it the check above would fail
        torch.testing.assert_close(fast_input, ref_input, rtol=0, atol=1e-5)
        assert fast_grads.keys() == ref_grads.keys()
        expert_lora = [n for n in ref_grads if "experts" in n and "lora_" in n]
        assert len(expert_lora) == 4 * model.config.num_hidden_layers  # A and B of gate_up and down, every layer
        for name in ref_grads:
            torch.testing.assert_close(fast_grads[name], ref_grads[name], rtol=0, atol=1e-5, msg=name)
        assert all(ref_grads[n].abs().max() > 0 for n in expert_lora)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fast_path_keeps_no_float_expert_stack_for_backward(kernel, q4_checkpoint, fast_shims):
    """What autograd saves between forward and backward: peft's path keeps W + delta stacks, the fast path does not."""
    import torch

    from shims.lora import fast_lora
    from shims.quant import storage

    q4_requires_fused()
    fast_lora.KERNEL = kernel
    model = q4_load(q4_checkpoint("qwen3_moe"))
    pm = _peft(model)
    # compare as sorted dims: implementations may save a transposed view of the stack
    stack_shapes = {tuple(sorted(storage.quantized_parametrization(m, n).logical_shape))
                    for _, m in storage.iter_expert_modules(model) for n in storage.expert_weight_names(m)}

    def saved(enabled):
        fast_lora.ENABLED = enabled
        shapes = []

        def pack(t):
            shapes.append(tuple(sorted(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pm(input_ids=q4_ids(), labels=q4_ids()).loss.backward()
        return shapes

    assert set(fast_lora.expert_lora_paths(pm).values()) == {KERNELS[kernel]}
    try:
        fast, peft = saved(True), saved(False)
    finally:
        fast_lora.ENABLED = True
    assert any(s in stack_shapes for s in peft)  # documents what the peft path holds
    assert not any(s in stack_shapes for s in fast)


def test_fallback_rules_are_reported(q4_checkpoint, fast_shims):
    import torch
    from transformers import AutoModelForCausalLM

    from shims.lora import fast_lora

    q4_requires_fused()
    pm = _peft(q4_load(q4_checkpoint("qwen3_moe")))
    name, wrapper = next((n, m) for n, m in pm.named_modules() if n.endswith("layers.0.mlp.experts"))
    assert fast_lora.path_of(wrapper) == "fast (grouped)" and fast_lora.kernel_of(wrapper) == "grouped"
    fast_lora.KERNEL = "loop"
    assert fast_lora.path_of(wrapper).startswith("fast (loop: forced")
    fast_lora.KERNEL = "auto"
    with pm.disable_adapter():
        assert fast_lora.path_of(wrapper) == "peft: adapters disabled"
    fast_lora.ENABLED = False
    assert fast_lora.path_of(wrapper).startswith("peft: fast path disabled")
    fast_lora.ENABLED = True
    pm.merge_adapter()
    assert fast_lora.path_of(wrapper) == "peft: adapter merged" and fast_lora.kernel_of(wrapper) is None
    pm.unmerge_adapter()
    assert fast_lora.path_of(wrapper) == "fast (grouped)"
    if _add_second_adapter(pm):  # a second adapter active at once -> peft's path
        assert "2 active adapters" in fast_lora.path_of(wrapper)

    float_model = AutoModelForCausalLM.from_pretrained(q4_checkpoint("qwen3_moe"), dtype=torch.float32)
    paths = fast_lora.expert_lora_paths(_peft(float_model))
    assert all(p.startswith("peft: ") and "not a shim-quantized" in p for p in paths.values())


def _add_second_adapter(pm) -> bool:
    """Activate a second expert adapter; False where peft allows only one target_parameters adapter (< 0.21)."""
    from peft import LoraConfig

    try:
        pm.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    except ValueError as exc:
        if "only one LoRA adapter per model with `target_parameters`" in str(exc):
            return False
        raise
    pm.base_model.set_adapter(["default", "second"])
    return True


def test_fallback_runs_peft_forward(q4_checkpoint, fast_shims, monkeypatch):
    """A call the fast path does not understand (keyword routing arguments) goes to peft's forward, same result."""
    import torch

    from shims.lora import fast_lora

    q4_requires_fused()
    model = q4_load(q4_checkpoint("gpt_oss"))
    pm = _peft(model)
    wrapper = next(m for n, m in pm.named_modules() if n.endswith("layers.0.mlp.experts"))
    calls = []
    routed = fast_lora.routed_lora_forward
    monkeypatch.setattr(fast_lora, "routed_lora_forward", lambda *a: calls.append(1) or routed(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        fast = wrapper(x, index, weights)
        assert calls == [1]
        peft_out = wrapper(x, top_k_index=index, top_k_weights=weights)
        assert calls == [1]
    torch.testing.assert_close(fast, peft_out, rtol=0, atol=1e-5)
    if _add_second_adapter(pm):
        with torch.no_grad():
            both = wrapper(x, index, weights)
        assert calls == [1]
        assert not torch.equal(both, peft_out)


def test_patch_disable_and_restore(q4_checkpoint):
    from peft.tuners.lora.layer import ParamWrapper

    import shims

    q4_requires_fused()
    native = ParamWrapper.forward
    shims.apply(only=[n for n in _SHIMS if n != "fast_expert_lora"])
    try:
        assert ParamWrapper.forward is native  # not applied -> peft's path everywhere
        status = {s["name"]: s for s in shims.status()}
        assert not status["fast_expert_lora"]["applied"]
        shims.apply(only=["fast_expert_lora"])
        assert ParamWrapper.forward is not native
    finally:
        shims.restore()
    assert ParamWrapper.forward is native


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_matmul_equals_per_group_matmuls(dtype):
    """The grouped autograd function (forward, input and weight gradients) == per-group matmuls, empty groups too."""
    import torch

    from shims.lora import fast_lora

    dtype = getattr(torch, dtype)
    if fast_lora._grouped_mm_fn() is None or fast_lora._probe_grouped_mm(torch.device("cpu"), dtype):
        pytest.skip(f"no CPU grouped_mm kernel for {dtype} in this torch")
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 0, 8]  # empty groups in the middle and no trailing rows
    x = torch.randn(sum(counts), 16, generator=g).to(dtype).requires_grad_(True)
    w_t = torch.randn(5, 32, 16, generator=g).to(dtype).requires_grad_(True)  # used transposed, as the experts are
    grad = torch.randn(sum(counts), 32, generator=g).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = fast_lora._grouped()[0].apply(x, w_t.transpose(1, 2), offs)
    out.backward(grad)
    xr, wr = x.detach().clone().requires_grad_(True), w_t.detach().clone().requires_grad_(True)
    ref = torch.cat([xe @ wr[e].t() for e, xe in enumerate(xr.split(counts)) if counts[e]])
    ref.backward(grad)
    exact = dict(rtol=0, atol=0) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **exact)
    torch.testing.assert_close(x.grad, xr.grad, **exact)
    torch.testing.assert_close(w_t.grad, wr.grad, **exact)
    assert torch.equal(w_t.grad[1], torch.zeros_like(w_t.grad[1]))  # an empty group's weight gets exactly zero


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_keeps_its_stack_for_backward(reentrant, q4_checkpoint, fast_shims, monkeypatch):
    """With gradient checkpointing each projection dequantizes twice per step (forward, recompute; the recompute's
    stack serves the backward), as often as without checkpointing (forward, backward), and the gradients are equal."""
    import torch

    from shims.lora import fast_lora

    q4_requires_fused()
    calls = []
    dequantize = fast_lora.dequantize_param
    monkeypatch.setattr(fast_lora, "dequantize_param", lambda m, n: calls.append(n) or dequantize(m, n))

    def step(checkpointing):
        model = q4_load(q4_checkpoint("qwen3_moe"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        pm = _peft(model)
        pm.train()  # transformers checkpoints only in training mode
        assert set(fast_lora.expert_lora_paths(pm).values()) == {KERNELS["auto"]}
        calls.clear()
        _, grads, _ = _step(pm, q4_ids())
        assert not any(fast_lora._RECOMPUTED.values())  # every kept stack was used and dropped by its backward
        return grads, len(calls) / (2 * model.config.num_hidden_layers)

    plain, plain_calls = step(False)
    checkpointed, checkpointed_calls = step(True)
    assert plain_calls == 2 and checkpointed_calls == 2  # before the recompute kept its stack: 3 with checkpointing
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
