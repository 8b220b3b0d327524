"""router_weight_reads: a router whose gating module reads its linear layer's weight as a tensor.

longcat_flash's ``LongcatFlashTopkRouter.forward`` computes ``F.linear(h.float(), self.classifier.weight.float())``
instead of calling ``self.classifier``. Under ``load_in_4bit`` bitsandbytes makes ``classifier`` a Linear4bit, whose
weight is packed bytes: the first 4-bit forward fails ("mat1 and mat2 shapes cannot be multiplied"), shims or not.
The patch stores that router with the shims' 4-bit storage (the same packed bytes and QuantState, dequantized on
read). Its experts are found too, although ``gate_up_proj`` holds routed + zero experts (E + Z) and ``down_proj`` E.
References are exact: the float model holding the 4-bit model's dequantized weights."""

import pytest

from conftest import q4_ids, q4_load, q4_reference, q4_requires_fused, saved_tiny

pytestmark = pytest.mark.needs_ml

LONGCAT = dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
               max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False, ffn_hidden_size=24,
               expert_ffn_hidden_size=24, n_routed_experts=4, moe_topk=2, kv_lora_rank=16, q_lora_rank=32,
               qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, zero_expert_num=4, qk_head_dim=32)
_BASE = ("quantize_fused_experts", "quantize_moe_routers", "prequantized_experts_checkpoint")


@pytest.fixture(scope="module")
def longcat_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "longcat_flash", **LONGCAT)


@pytest.fixture
def apply_shims():
    import shims

    q4_requires_fused()
    applied = []

    def apply(names):
        status = {s["name"]: s for s in shims.apply(only=names)}
        applied.append(status)
        return status

    yield apply
    if applied:
        shims.restore()


def _classifiers(model):
    return {n: m for n, m in model.named_modules() if n.endswith("mlp.router.classifier")}


def _check_exact(model, path):
    import torch

    from cases.measure import keep_bnb_compute_dtype

    keep_bnb_compute_dtype(model)
    ids = q4_ids()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, q4_reference(model, path)(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    return got


def test_without_it_the_4bit_forward_fails(longcat_checkpoint, apply_shims):
    """The symptom (upstream, and with the other shims): the router multiplies a Linear4bit's packed bytes."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from cases.measure import keep_bnb_compute_dtype

    apply_shims(_BASE)
    model = q4_load(longcat_checkpoint)
    assert all(isinstance(m, Linear4bit) for m in _classifiers(model).values())
    keep_bnb_compute_dtype(model)
    with pytest.raises(RuntimeError, match="cannot be multiplied"), torch.no_grad():
        model(input_ids=q4_ids())


def test_router_read_as_a_tensor_is_4bit_and_the_forward_exact(longcat_checkpoint, apply_shims, tmp_path):
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from cases.measure import expert_storage, keep_bnb_compute_dtype
    from shims.quant import quant_router, storage

    status = apply_shims(_BASE + ("router_weight_reads",))
    assert status["router_weight_reads"]["applied"], status["router_weight_reads"]
    model = q4_load(longcat_checkpoint)
    classifiers = _classifiers(model)
    assert len(classifiers) == 2
    for module in classifiers.values():  # an nn.Linear (parametrized: torch's ParametrizedLinear), no Linear4bit
        assert isinstance(module, torch.nn.Linear) and not isinstance(module, Linear4bit)
        assert storage.quantized_tensor_names(module) == ("weight",)
    assert set(dict(quant_router.iter_routers(model))) == set(classifiers)
    counts = quant_router.router_storage(model)
    assert counts["routers"] == counts["quantized"] == 2
    experts = expert_storage(model)
    assert experts["expert_tensors"] == experts["quantized"] == 4  # gate_up (E + Z) and down (E), both layers
    before = _check_exact(model, longcat_checkpoint)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert all(storage.quantized_tensor_names(m) == ("weight",) for m in _classifiers(reloaded).values())
    assert quant_router.router_storage(reloaded)["quantized"] == 2
    keep_bnb_compute_dtype(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=q4_ids()).logits, before)


def test_the_same_bytes_as_bitsandbytes_stored(longcat_checkpoint, apply_shims):
    """Nothing re-quantized: the shims' router is bitsandbytes' own packed data and state."""
    import bitsandbytes.functional as BF
    import torch

    import shims
    from shims.quant import storage

    apply_shims(_BASE)
    native = {n: BF.dequantize_4bit(m.weight.data, m.weight.quant_state)
              for n, m in _classifiers(q4_load(longcat_checkpoint)).items()}
    shims.restore()
    apply_shims(_BASE + ("router_weight_reads",))
    for name, module in _classifiers(q4_load(longcat_checkpoint)).items():
        assert torch.equal(storage.dequantize_param(module, "weight"), native[name]), name


def test_reads_weight_as_tensor_reads_the_class_source():
    import torch
    import torch.nn.functional as F

    from shims.quant.quant_router import reads_weight_as_tensor

    class ReadsWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 2)

        def forward(self, x):
            return F.linear(x, self.classifier.weight)

    class CallsLayer(ReadsWeight):
        pass

    class Calls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.classifier(x)

    assert reads_weight_as_tensor(ReadsWeight(), "classifier")
    assert reads_weight_as_tensor(CallsLayer(), "classifier")  # inherited forward
    assert not reads_weight_as_tensor(Calls(), "classifier")
    assert not reads_weight_as_tensor(ReadsWeight(), "class")  # whole names only
