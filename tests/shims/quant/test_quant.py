"""shims.quant.loader_v5 + shims.quant.storage: fused MoE experts become real bitsandbytes 4-bit at load (transformers 5.x)."""

import logging

import pytest

from conftest import Q4_ARCHS, lx_build_tiny_moe, q4_load, q4_requires_fused, q4_warmup_sizes

pytestmark = pytest.mark.needs_ml


def _float_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("model_type", Q4_ARCHS)
def test_experts_are_4bit_after_load(model_type, q4_checkpoint, q4_shims):
    import bitsandbytes.functional as BF
    import torch

    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint(model_type)
    model = q4_load(path)
    ref = _float_model(path)
    layers = model.config.num_hidden_layers
    counts = storage.expert_storage(model)
    assert counts["expert_tensors"] == counts["quantized"] == 2 * layers
    assert counts["bytes"] / counts["bf16_bytes"] <= 0.29
    for name, module in storage.iter_expert_modules(model):
        assert storage.is_quantized_experts(module)
        ref_module = ref.get_submodule(name)
        for pname in ("gate_up_proj", "down_proj"):
            packed = module.parametrizations[pname].original
            assert packed.dtype == torch.uint8 and not packed.requires_grad
            assert not any(p.is_floating_point() and p.dim() == 3 for p in module.parameters())
            original = getattr(ref_module, pname)
            deq = storage.dequantize_param(module, pname)
            assert deq.shape == original.shape and deq.dtype == torch.float32  # logical shape, compute dtype
            # bitsandbytes' own nf4 round trip of the checkpoint tensor, bit for bit (decoded flat: its 3D CPU
            # decode is wrong when the last dim is not a multiple of 64, e.g. gpt_oss's (E, 64, 48) here)
            packed_ref, state_ref = BF.quantize_4bit(original.detach(), quant_type="nf4")
            assert torch.equal(packed, packed_ref)
            flat_ref = BF.dequantize_4bit(packed_ref.reshape(-1, 1), BF.QuantState(
                absmax=state_ref.absmax, shape=torch.Size([original.numel()]), code=state_ref.code,
                blocksize=state_ref.blocksize, quant_type=state_ref.quant_type, dtype=state_ref.dtype))
            assert torch.equal(deq, flat_ref.reshape(original.shape))
        if model_type == "gpt_oss":  # transposed layout keeps its float biases
            assert module.is_transposed
            assert module.gate_up_proj_bias.dtype == torch.float32
            assert torch.equal(module.gate_up_proj_bias, ref_module.gate_up_proj_bias)


def test_quantized_tensor_by_tensor_while_loading(q4_checkpoint, q4_shims, caplog):
    from shims.quant import storage

    q4_requires_fused()
    with caplog.at_level(logging.DEBUG, logger="shims"):
        model = q4_load(q4_checkpoint("qwen3_moe"))
    messages = [r.getMessage() for r in caplog.records if r.name == "shims"]
    assert sum(m.startswith("quantized model.layers.") for m in messages) == 4
    assert not any("after loading" in m for m in messages)  # the post-load safety net found nothing left
    assert storage.expert_storage(model)["quantized"] == 4


def test_bnb_config_is_honoured(q4_checkpoint, q4_shims):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint("qwen3_moe")
    model = q4_load(path, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
                    llm_int8_skip_modules=["lm_head", "model.layers.1.mlp.experts"])
    kept = model.model.layers[1].mlp.experts
    assert not storage.is_quantized_experts(kept) and kept.gate_up_proj.dtype == torch.float32
    experts = model.model.layers[0].mlp.experts
    param = storage.quantized_parametrization(experts, "gate_up_proj")
    assert param.quant_state.quant_type == "fp4" and param.quant_state.nested
    assert experts.parametrizations["gate_up_proj"].original.dtype == torch.bfloat16  # quant_storage
    assert storage.dequantize_param(experts, "gate_up_proj").dtype == torch.bfloat16  # compute dtype
    counts = storage.expert_storage(model)
    assert (counts["expert_tensors"], counts["quantized"]) == (4, 2)


def test_double_quant_is_smaller(q4_checkpoint, q4_shims):
    from shims.quant import bnb_config, storage

    q4_requires_fused()
    loaded = storage.expert_storage(q4_load(q4_checkpoint("qwen3_moe"), bnb_4bit_use_double_quant=True))
    assert loaded["quantized"] == loaded["expert_tensors"] == 4
    # The nested statistics carry a fixed 256-entry table per tensor, so the saving needs realistic sizes.
    ratios = {}
    for nested in (False, True):
        m = _toy_experts((8, 512, 256), (8, 256, 256))
        settings = bnb_config.QuantSettings(compress_statistics=nested)
        for name in ("gate_up_proj", "down_proj"):
            storage.quantize_expert_param(m, name, settings)
        s = storage.expert_storage(m)
        ratios[nested] = s["bytes"] / s["bf16_bytes"]
    assert ratios[False] <= 0.29 and ratios[True] <= 0.27 and ratios[True] < ratios[False]


def test_apply_twice_is_noop_and_restore_is_native(q4_checkpoint):
    q4_requires_fused()
    import transformers.core_model_loading as cml

    import shims
    from shims.quant import storage

    native = cml.set_param_for_module
    first = shims.apply(only=["quantize_fused_experts"])
    patched = cml.set_param_for_module
    second = shims.apply(only=["quantize_fused_experts"])
    try:
        assert patched is not native and cml.set_param_for_module is patched
        assert [s["applied"] for s in first] == [s["applied"] for s in second]
        assert next(s for s in second if s["name"] == "quantize_fused_experts")["applied"]
    finally:
        shims.restore()
    assert cml.set_param_for_module is native
    model = q4_load(q4_checkpoint("qwen3_moe"))
    counts = storage.expert_storage(model)
    assert counts["quantized"] == 0 and counts["expert_tensors"] == 4  # upstream behaviour: experts stay float


def test_not_needed_without_fused_experts():
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    import shims
    from shims.loader_generation import V5, transformers_loader

    if transformers_loader() == V5:
        pytest.skip("fused experts exist here; the 4.x behaviour is checked on transformers 4.57")
    native = Bnb4BitHfQuantizer._process_model_after_weight_loading
    try:
        result = {s["name"]: s for s in shims.apply(only=["quantize_fused_experts"])}
        assert Bnb4BitHfQuantizer._process_model_after_weight_loading is native  # nothing changed
    finally:
        shims.restore()
    assert not result["quantize_fused_experts"]["applied"]
    assert result["quantize_fused_experts"]["reason"].startswith("not needed: transformers loads through its 4.x")


def test_dense_model_unchanged(q4_shims, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shims.quant import storage

    cfg = AutoConfig.for_model("qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = q4_load(str(tmp_path))
    assert storage.expert_storage(model) == dict(expert_tensors=0, quantized=0, bytes=0, bf16_bytes=0)
    assert not any(storage.is_quantized_experts(m) for m in model.modules())
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long)).logits).all()


# ---- errors: never a silent fallback ------------------------------------------------------------------------


def _toy_experts(shape_gate=(4, 48, 64), shape_down=(4, 64, 24), dtype=None):
    import torch

    m = torch.nn.Module()
    m.gate_up_proj = torch.nn.Parameter(torch.randn(*shape_gate, dtype=dtype or torch.float32))
    m.down_proj = torch.nn.Parameter(torch.randn(*shape_down, dtype=dtype or torch.float32))
    return m


def test_dequantize_param_on_float_module_names_it():
    from shims.quant import storage

    q4_requires_fused()
    with pytest.raises(storage.ExpertQuantError, match=r"Module\.gate_up_proj is not a shim-quantized"):
        storage.dequantize_param(_toy_experts(), "gate_up_proj")


def test_missing_quant_state_raises_naming_module():
    from shims.quant import bnb_config, storage

    q4_requires_fused()
    m = _toy_experts()
    storage.quantize_expert_param(m, "gate_up_proj", bnb_config.QuantSettings(), owner="layers.3.mlp.experts")
    assert storage.is_quantized_experts(m)
    storage.quantized_parametrization(m, "gate_up_proj").quant_state = None
    with pytest.raises(storage.ExpertQuantError, match=r"layers\.3\.mlp\.experts\.gate_up_proj.*QuantState"):
        m.gate_up_proj
    with pytest.raises(storage.ExpertQuantError, match="QuantState"):
        storage.expert_storage(m)


def test_packed_bytes_without_state_raise():
    import torch

    from shims.quant import storage

    q4_requires_fused()
    m = _toy_experts()
    m.gate_up_proj = torch.nn.Parameter(torch.zeros(6144, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(storage.ExpertQuantError, match=r"gate_up_proj: holds torch\.uint8.*no 4-bit quantization state"):
        storage.expert_weight_names(m)


@pytest.mark.parametrize("shape", [(48, 64), (2, 4, 48, 64)])
def test_unknown_layout_raises(shape):
    from shims.quant import bnb_config, storage

    q4_requires_fused()
    m = _toy_experts(shape_gate=shape)
    with pytest.raises(storage.ExpertQuantError, match=r"gate_up_proj: shape .* expected 3D"):
        storage.expert_weight_names(m)
    with pytest.raises(storage.ExpertQuantError, match="expected a float 3D"):
        storage.quantize_expert_param(m, "gate_up_proj", bnb_config.QuantSettings())


def test_cast_packed_storage_is_detected():
    import torch

    from shims.quant import bnb_config, storage

    q4_requires_fused()
    m = _toy_experts()
    storage.quantize_expert_param(m, "down_proj", bnb_config.QuantSettings(quant_storage=torch.bfloat16), owner="x")
    m.to(torch.float32)  # a float quant_storage is cast by .to(dtype): the packed bytes are gone
    with pytest.raises(storage.ExpertQuantError, match=r"x\.down_proj: packed 4-bit storage has dtype torch\.float32"):
        m.down_proj


# ---- chunked quantization: the same bytes as bitsandbytes' whole-tensor call ---------------------------------


def _assert_same_quantization(got, want):
    import torch

    (packed, state), (ref_packed, ref_state) = got, want
    # compare bytes: packed codes viewed as a float quant_storage contain NaN patterns (NaN != NaN)
    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    assert tuple(state.shape) == tuple(ref_state.shape) and state.dtype == ref_state.dtype
    assert (state.blocksize, state.quant_type, state.nested) == (ref_state.blocksize, ref_state.quant_type,
                                                                 ref_state.nested)
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.code, ref_state.code)
    if ref_state.nested:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
        assert state.state2.blocksize == ref_state.state2.blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("packed_dtype, compute, blocksize", [("uint8", "float32", None), ("bfloat16", "bfloat16", 128),
                                                         ("uint8", "bfloat16", 64)])
def test_chunked_quantization_is_bit_exact(quant_type, nested, packed_dtype, compute, blocksize):
    import bitsandbytes.functional as BF
    import torch

    from shims.quant import storage

    q4_requires_fused()
    torch.manual_seed(0)
    # 7 experts in chunks of 2 (the last one short); bf16 checkpoint values cast per chunk to the compute dtype
    tensor = (torch.randn(7, 96, 64) * torch.linspace(0.1, 3, 7).view(7, 1, 1)).to(torch.bfloat16)
    packed_dtype, compute = getattr(torch, packed_dtype), getattr(torch, compute)
    kwargs = dict(blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=packed_dtype)
    got = storage.quantize_experts_chunked(tensor, compute, chunk_elements=2 * 96 * 64, **kwargs)
    want = BF.quantize_4bit(tensor.to(compute), **kwargs)
    _assert_same_quantization(got, want)
    assert torch.equal(BF.dequantize_4bit(*got), BF.dequantize_4bit(*want))


def test_chunked_quantization_falls_back_when_blocks_straddle_experts(caplog):
    import bitsandbytes.functional as BF
    import torch

    from shims.quant import storage

    q4_requires_fused()
    tensor = torch.randn(5, 3, 30)  # 90 elements per expert: 64-blocks would cross expert boundaries
    with caplog.at_level(logging.DEBUG, logger="shims"):
        got = storage.quantize_experts_chunked(tensor, torch.float32, compress_statistics=True, chunk_elements=90)
    assert any("not whole 64-blocks" in r.getMessage() for r in caplog.records)
    _assert_same_quantization(got, BF.quantize_4bit(tensor, compress_statistics=True, quant_type="nf4"))


def test_quantize_expert_param_uses_chunks_and_matches_whole_tensor(monkeypatch):
    import bitsandbytes.functional as BF

    from shims.quant import bnb_config, storage

    q4_requires_fused()
    calls = []
    real = BF.quantize_4bit
    monkeypatch.setattr(BF, "quantize_4bit", lambda A, **kw: calls.append(tuple(A.shape)) or real(A, **kw))
    monkeypatch.setattr(storage, "CHUNK_ELEMENTS", 2 * 48 * 64)
    m = _toy_experts(shape_gate=(5, 48, 64))
    ref = m.gate_up_proj.detach().clone()
    storage.quantize_expert_param(m, "gate_up_proj", bnb_config.QuantSettings(compress_statistics=True))
    assert [c for c in calls if len(c) == 3] == [(2, 48, 64), (2, 48, 64), (1, 48, 64)]  # (1D: blocksize probe)
    want = real(ref, compress_statistics=True, quant_type="nf4")
    state = storage.quantized_parametrization(m, "gate_up_proj").quant_state
    _assert_same_quantization((m.parametrizations["gate_up_proj"].original, state), want)


# ---- streaming: per-expert checkpoint tensors are quantized chunk by chunk, never fused in float ----------------


def _streamed_and_fallback_messages(records):
    messages = [r.getMessage() for r in records if r.name == "shims" and r.getMessage().startswith("quantized model.")]
    return (sum(m.endswith("(streamed per expert chunk)") for m in messages),
            sum(not m.endswith("(streamed per expert chunk)") for m in messages))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_per_expert_checkpoint_is_streamed_bit_exact(model_type, q4_checkpoint, q4_shims, caplog, monkeypatch):
    import bitsandbytes.functional as BF
    import torch

    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint(model_type)
    # one gate_up expert (48*64) per chunk, two down_proj experts (64*24) per chunk: several chunks per tensor
    monkeypatch.setattr(storage, "CHUNK_ELEMENTS", 48 * 64)
    with caplog.at_level(logging.DEBUG, logger="shims"):
        model = q4_load(path, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)
    layers = model.config.num_hidden_layers
    assert _streamed_and_fallback_messages(caplog.records) == (2 * layers, 0)
    ref = _float_model(path)
    for name, module in storage.iter_expert_modules(model):
        for pname in ("gate_up_proj", "down_proj"):
            want = BF.quantize_4bit(getattr(ref.get_submodule(name), pname).detach().to(torch.bfloat16),
                                    quant_type="fp4", compress_statistics=True)
            got = (module.parametrizations[pname].original, storage.quantized_parametrization(module, pname).quant_state)
            _assert_same_quantization(got, want)
            assert storage.dequantize_param(module, pname).dtype == torch.bfloat16


def test_experts_not_whole_blocks_are_quantized_fused(q4_shims, caplog, tmp_path):
    import bitsandbytes.functional as BF

    from shims.quant import storage

    q4_requires_fused()
    import torch

    # down_proj experts of 40*25 = 1000 elements are not whole 64-blocks: no streaming, the fused tensor is quantized
    lx_build_tiny_moe("qwen3_moe", dtype=torch.float32, hidden_size=40, head_dim=16,
                      expert_dim=25).save_pretrained(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="shims"):
        model = q4_load(str(tmp_path))
    streamed, fused = _streamed_and_fallback_messages(caplog.records)
    assert fused == 2 * model.config.num_hidden_layers and streamed == 0  # gate_up 50*40 = 2000 is not whole either
    ref = _float_model(str(tmp_path))
    for name, module in storage.iter_expert_modules(model):
        for pname in ("gate_up_proj", "down_proj"):
            want = BF.quantize_4bit(getattr(ref.get_submodule(name), pname).detach(), quant_type="nf4")
            got = (module.parametrizations[pname].original, storage.quantized_parametrization(module, pname).quant_state)
            _assert_same_quantization(got, want)


def test_gpu_warmup_counts_fused_experts_as_4bit(q4_shims, q4_checkpoint):
    """from_pretrained reserves GPU memory up front from param_element_size; fused experts must count 4-bit there
    (counted in bf16 they made that one reservation 2.3x the loaded 4-bit model on an H200)."""
    from shims.quant import storage

    q4_requires_fused()
    model, sizes = q4_warmup_sizes(q4_checkpoint("qwen3_moe"))
    experts = {f"{name}.{p}" for name, module in storage.iter_expert_modules(model) for p in storage.expert_weight_names(module)}
    assert len(experts) == 2 * model.config.num_hidden_layers
    for name, param in model.named_parameters():
        if name in experts:
            assert sizes[name] == 0.5, name
        elif "router" in name or "gate.weight" in name or "norm" in name or "embed" in name:
            assert sizes[name] == param.element_size(), name  # only experts change


@pytest.mark.parametrize("arch", Q4_ARCHS)
def test_loading_never_dequantizes_experts(q4_shims, q4_checkpoint, arch, monkeypatch):
    """Dequantizing during the load (e.g. transformers re-initialising loaded experts) costs a whole float copy of
    the largest expert tensor at peak; a loaded 4-bit model must come out of from_pretrained without one."""
    from shims.quant import storage

    q4_requires_fused()
    calls = []
    cls = storage.parametrization_class()
    original = cls.forward
    monkeypatch.setattr(cls, "forward", lambda self, packed: calls.append(self.owner) or original(self, packed))
    model = q4_load(q4_checkpoint(arch))
    assert storage.expert_storage(model)["quantized"] == 2 * model.config.num_hidden_layers
    assert calls == []


def test_dequantized_experts_are_within_nf4_rounding_whatever_the_last_dim():
    """bitsandbytes 0.50.2 on CPU decodes 3D tensors whose last dim is not a multiple of 64 wrongly; the shims'
    storage must give the true values (each element within half the widest nf4 code gap x its block's absmax)."""
    import torch

    from shims.quant import storage

    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    for shape in ((4, 64, 48), (4, 48, 64), (3, 16, 40)):  # gpt_oss-like (E, H, 2I) with 2I = 48
        module = torch.nn.Module()
        module.gate_up_proj = torch.nn.Parameter(torch.randn(*shape), requires_grad=False)
        weight = module.gate_up_proj.detach().clone()
        storage.quantize_expert_param(module, "gate_up_proj", storage.QuantSettings(compute_dtype=torch.float32),
                                      "test")
        got = storage.dequantize_param(module, "gate_up_proj")
        absmax = storage.quantized_parametrization(module, "gate_up_proj").quant_state.absmax
        per_element = absmax.repeat_interleave(64)[:weight.numel()].reshape(shape)
        assert float(((got - weight).abs() / per_element).max()) <= 0.1520, shape
