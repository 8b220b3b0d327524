"""LoRA on expert stacks stored flattened to 2D (dbrx: ``experts.mlp.w1`` / ``v1`` / ``w2``, each (E * F, H)).

DbrxExperts reads the stacks of its child as ``self.mlp.w1`` outside that child's forward. Natively (float or 4-bit)
peft's ParamWrapper around ``experts.mlp`` makes that read an AttributeError; with the patch ``wrapped_tensor_reads``
the read returns the tensor plus its active LoRA. References are exact: the model whose stacks hold ``W + delta``
(peft's own ``get_delta_weight``), for 4-bit the float model holding the dequantized weights.
"""

from __future__ import annotations

import contextlib

import pytest

from conftest import q4_ids, q4_load, q4_reference, q4_requires_fused, saved_tiny

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from shims.lora import peft_experts  # noqa: E402

PATCH = next(p for p in peft_experts.PATCHES if p.name == "wrapped_tensor_reads")
TARGETS = ["ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"]
# a tiny dbrx as cases/discover.py's override builds it (its default config does not build)
DBRX = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=128, initializer_range=0.2,
            tie_word_embeddings=False, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2})
_SHIMS = ("quantize_fused_experts", "quantize_moe_routers", "prequantized_experts_checkpoint", "peft_quantized_experts",
          "peft_merge_quantized_experts", "wrapped_tensor_reads")


@contextlib.contextmanager
def installed():
    undo = PATCH.install()
    try:
        yield
    finally:
        undo()


@pytest.fixture(scope="module")
def dbrx_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "dbrx", check_forward=True, **DBRX)


def _lora(model, seed=1):
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS,
                                                      init_lora_weights=False)).eval()


def _wrappers(experts_module):
    """The ParamWrapper chain around ``experts.mlp``, outermost first."""
    chain, module = [], experts_module.mlp
    while hasattr(module, "parameter_name"):
        chain.append(module)
        module = module.base_layer
    return chain


def _add_deltas(peft_model, ref):
    """``ref`` with every adapted stack set to W + peft's own delta of the same LoRA."""
    with torch.no_grad():
        for i, block in enumerate(peft_model.base_model.model.transformer.blocks):
            for wrapper in _wrappers(block.ffn.experts):
                stack = getattr(ref.transformer.blocks[i].ffn.experts.mlp, wrapper.parameter_name)
                stack += wrapper.get_delta_weight("default").float()
    return ref


def test_float_dbrx_lora_fails_natively_and_computes_w_plus_delta_with_the_patch(dbrx_checkpoint):
    from transformers import AutoModelForCausalLM

    if PATCH.needed() is not None:
        pytest.skip(f"not needed here: {PATCH.needed()}")

    def load():
        return AutoModelForCausalLM.from_pretrained(dbrx_checkpoint, dtype=torch.float32).eval()

    ids = q4_ids()
    model = _lora(load())
    assert len(_wrappers(model.base_model.model.transformer.blocks[0].ffn.experts)) == 3
    with pytest.raises(AttributeError, match="ParamWrapper.*has no attribute"):
        model(input_ids=ids)
    with installed():
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = _add_deltas(model, load())(input_ids=ids).logits
            base = load()(input_ids=ids).logits
            with model.disable_adapter():
                disabled = model(input_ids=ids).logits
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
        assert (got - base).abs().max() > 1e-6  # the LoRA matters: a read without it would fail the check above
        assert torch.equal(disabled, base)
        # every factor of every stack gets a gradient
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert len(lora) == 12 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
        merged = model.merge_and_unload().eval()
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, got, rtol=0, atol=1e-5)


def test_4bit_dbrx_lora_forward_reload_and_export_are_exact(dbrx_checkpoint, tmp_path):
    """With the shims: 4-bit stacks, LoRA forward = the dequantized float model + the deltas; the adapter reloads
    to the same logits; save_merged's export computes them."""
    q4_requires_fused()
    import shims
    from transformers import AutoModelForCausalLM

    from cases.measure import keep_bnb_compute_dtype
    from shims.quant import storage

    shims.apply(only=_SHIMS)
    try:
        def load4():
            model = q4_load(dbrx_checkpoint)
            keep_bnb_compute_dtype(model)
            return model

        qmodel = load4()
        assert set(storage.quantized_tensor_names(qmodel.transformer.blocks[0].ffn.experts.mlp)) == {"w1", "v1", "w2"}
        ref = q4_reference(qmodel, dbrx_checkpoint)
        model = _lora(qmodel)
        ids = q4_ids()
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = _add_deltas(model, ref)(input_ids=ids).logits
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()

        model.save_pretrained(tmp_path / "adapter")
        reloaded = peft.PeftModel.from_pretrained(load4(), tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, got)

        shims.save_merged(model, tmp_path / "merged", dtype=torch.float32, tokenizer=False)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        with torch.no_grad():
            exported = merged(input_ids=ids).logits
        assert torch.allclose(exported, got, rtol=0, atol=1e-4), (exported - got).abs().max()
    finally:
        shims.restore()


def test_a_delta_that_does_not_fit_the_stack_is_an_error():
    """A wrapper whose delta has another shape than the tensor read through it raises instead of broadcasting."""
    if PATCH.needed() is not None:
        pytest.skip(f"not needed here: {PATCH.needed()}")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(8, 6))
            self.w2 = torch.nn.Parameter(torch.randn(8, 6))

    parent = torch.nn.Module()
    parent.mlp = Holder()
    model = peft.get_peft_model(parent, peft.LoraConfig(r=2, target_modules=[], target_parameters=["mlp.w1", "mlp.w2"],
                                                        init_lora_weights=False))
    wrapper = model.base_model.model.mlp
    with installed():
        holder = wrapper.get_base_layer()  # the Holder itself (``parent.mlp`` is the wrapper now)
        torch.testing.assert_close(wrapper.w1, holder.w1 + wrapper.base_layer.get_delta_weight("default"))
        original = type(wrapper).get_delta_weight
        try:
            type(wrapper).get_delta_weight = lambda self, adapter: torch.zeros(3)
            with pytest.raises(peft_experts.WrappedTensorReadError, match="does not fit"):
                wrapper.w2
        finally:
            type(wrapper).get_delta_weight = original
