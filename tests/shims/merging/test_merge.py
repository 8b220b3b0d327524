"""merge / unmerge / merge_and_unload of expert LoRA into 4-bit experts, against exact references."""

import pytest

from conftest import q4_load, q4_lora_pair, q4_reference, q4_requires_fused

pytestmark = pytest.mark.needs_ml


def _requant(value, like_param):
    """bitsandbytes round trip with the settings of one shim parametrization (the exact expected storage)."""
    import bitsandbytes.functional as BF

    s = like_param.settings
    packed, state = BF.quantize_4bit(value.to(s.compute_dtype), blocksize=s.blocksize,
                                     compress_statistics=s.compress_statistics, quant_type=s.quant_type,
                                     quant_storage=s.quant_storage)
    from shims.quant.storage import dequantize_flat  # bitsandbytes' 3D CPU decode is wrong for unaligned last dims

    return packed, dequantize_flat(packed, state)


def _pairs(pq, pr):
    from peft.tuners.lora.layer import ParamWrapper

    ref_modules = dict(pr.named_modules())
    return [(w, ref_modules[n]) for n, w in pq.named_modules() if isinstance(w, ParamWrapper)]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_merge_and_unload_equals_requantized_reference(model_type, q4_checkpoint, q4_shims):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint(model_type)
    qmodel = q4_load(path)
    pq, pr = q4_lora_pair(qmodel, q4_reference(qmodel, path))
    expected = {}
    for w, rw in _pairs(pq, pr):
        name = w.parameter_name
        base = rw.get_base_layer()
        # reference: float dequantized weight + peft's own delta (its layout convention), then bnb re-quantization
        target = getattr(base, name).detach() + rw.get_delta_weight("default")
        param = storage.quantized_parametrization(w.get_base_layer(), name)
        expected[(id(w.get_base_layer()), name)] = _requant(target, param)
    merged = pq.merge_and_unload(safe_merge=True)
    checked = 0
    for _, module in storage.iter_expert_modules(merged):
        for name in ("gate_up_proj", "down_proj"):
            packed, deq = expected[(id(module), name)]
            assert torch.equal(module.parametrizations[name].original, packed)
            assert torch.equal(storage.dequantize_param(module, name), deq)
            checked += 1
    assert checked == 2 * qmodel.config.num_hidden_layers
    assert storage.expert_storage(merged)["quantized"] == checked


def test_merge_then_unmerge_restores(q4_checkpoint, q4_shims):
    import torch

    from shims.merging import merge
    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint("qwen3_moe")
    qmodel = q4_load(path)
    pq, pr = q4_lora_pair(qmodel, q4_reference(qmodel, path))
    pairs = _pairs(pq, pr)
    originals = {id(w): w.get_base_layer().parametrizations[w.parameter_name].original.clone() for w, _ in pairs}
    weights = {id(w): storage.dequantize_param(w, w.parameter_name) for w, _ in pairs}
    pq.merge_adapter()
    for w, _ in pairs:
        assert w.merged
        assert not torch.equal(storage.dequantize_param(w, w.parameter_name), weights[id(w)])
    pq.unmerge_adapter()
    for w, _ in pairs:  # default: the pre-merge bytes come back exactly
        assert not w.merged
        assert torch.equal(w.get_base_layer().parametrizations[w.parameter_name].original, originals[id(w)])

    merge.KEEP_PREMERGE_COPY = False  # memory-saving mode: unmerge re-quantizes W' - delta
    try:
        pq.merge_adapter()
        merged = {id(w): storage.dequantize_param(w, w.parameter_name) for w, _ in pairs}
        deltas = {id(w): w.get_delta_weight("default") for w, _ in pairs}
        pq.unmerge_adapter()
    finally:
        merge.KEEP_PREMERGE_COPY = True
    for w, _ in pairs:
        param = storage.quantized_parametrization(w.get_base_layer(), w.parameter_name)
        _, expected = _requant(merged[id(w)] - deltas[id(w)], param)
        got = storage.dequantize_param(w, w.parameter_name)
        assert torch.equal(got, expected)
        # documented bound: within a few 4-bit steps of the original weights
        assert (got - weights[id(w)]).abs().max() <= 0.5 * weights[id(w)].abs().max()


def test_safe_merge_refuses_non_finite(q4_checkpoint, q4_shims):
    import torch

    from shims.quant import storage

    q4_requires_fused()
    path = q4_checkpoint("qwen3_moe")
    qmodel = q4_load(path)
    pq, pr = q4_lora_pair(qmodel, q4_reference(qmodel, path))
    w, _ = _pairs(pq, pr)[0]
    before = w.get_base_layer().parametrizations[w.parameter_name].original.clone()
    with torch.no_grad():
        w.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        w.merge(safe_merge=True)
    assert not w.merged
    assert torch.equal(w.get_base_layer().parametrizations[w.parameter_name].original, before)
    assert storage.is_quantized_experts(w)


def test_float_experts_still_merge_natively(q4_checkpoint, q4_shims):
    """The patch only takes over for quantized tensors: float experts keep peft's exact in-place merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    q4_requires_fused()
    model = AutoModelForCausalLM.from_pretrained(q4_checkpoint("qwen3_moe"), dtype=torch.float32)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                          target_parameters=["mlp.experts.gate_up_proj"]))
    wrapper = pm.base_model.model.model.layers[0].mlp.experts
    delta = wrapper.get_delta_weight("default")
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged.model.layers[0].mlp.experts.gate_up_proj, before + delta, rtol=0, atol=1e-6)
