"""shims.compat.branch_dtype: ergo's decoder layer (transformers >= 5.25) casts its hidden states to
``self_attn.o_proj.weight.dtype``, uint8 once o_proj is a bitsandbytes Linear4bit: natively a 4-bit load cannot run a
forward; with the patch it equals the float model holding the dequantized weights."""

import pytest

from conftest import q4_ids, q4_load, q4_reference, q4_requires_fused, saved_tiny
from tests.shims.lora.test_fast_lora_refusal import ERGO

pytestmark = pytest.mark.needs_ml

_EXPERTS = ("quantize_fused_experts", "peft_quantized_experts", "peft_merge_quantized_experts")


@pytest.fixture(scope="module")
def ergo_checkpoint(tmp_path_factory):
    return saved_tiny(tmp_path_factory, "ergo", **ERGO)


def _forward(model):
    import torch

    with torch.no_grad():
        return model(q4_ids()).logits


def test_4bit_ergo_runs_and_equals_dequantized_float_model(ergo_checkpoint):
    import bitsandbytes as bnb
    import torch

    import shims
    from shims.compat import branch_dtype

    q4_requires_fused()
    shims.apply(only=_EXPERTS)
    try:
        native = q4_load(ergo_checkpoint)
        native_wrapper_code = type(native.model.layers[0]).forward.__code__
        native_forward = type(native.model.layers[0]).forward.__wrapped__
        assert isinstance(native.model.layers[0].self_attn.o_proj, bnb.nn.Linear4bit)
        assert native.model.layers[0].self_attn.o_proj.weight.dtype == torch.uint8
        with pytest.raises(RuntimeError, match="same dtype"):  # the native symptom
            _forward(native)
        status = {s["name"]: s for s in shims.apply(only=["branch_dtype_4bit"])}["branch_dtype_4bit"]
        assert status["applied"], status
        model = q4_load(ergo_checkpoint)
        layer_forward = type(model.model.layers[0]).forward
        assert layer_forward.__wrapped__.__code__ is not native_forward.__code__  # recompiled ...
        assert layer_forward.__code__ is native_wrapper_code  # ... inside transformers' checkpointing wrapper, kept
        assert branch_dtype.weight_dtype(model.model.layers[0].self_attn.o_proj) == torch.float32
        got = _forward(model)
        want = _forward(q4_reference(model, ergo_checkpoint))  # float model, patched forward reads plain dtypes
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    finally:
        shims.restore()
    with pytest.raises(RuntimeError, match="same dtype"):  # restore() undid it
        _forward(q4_load(ergo_checkpoint))


def test_detection_reads_the_source():
    from shims.compat import branch_dtype

    class Reads:
        def forward(self, x):
            return x.to(self.attn.proj.weight.dtype)

    class DoesNot:
        def forward(self, x):
            return x.to(self.attn.dtype)

    assert branch_dtype.reads_weight_dtype(Reads.forward)
    assert not branch_dtype.reads_weight_dtype(DoesNot.forward)


def test_not_needed_without_such_a_layer():
    import shims
    from shims.compat import branch_dtype

    if branch_dtype._affected():
        pytest.skip("this transformers has ergo (covered above)")
    status = {s["name"]: s for s in shims.apply(only=["branch_dtype_4bit"])}["branch_dtype_4bit"]
    shims.restore()
    assert status["reason"] == "not needed: no declared decoder layer reads a linear layer's .weight.dtype in its forward"


def test_4bit_ergo_saves_and_reloads_bit_exact(ergo_checkpoint, tmp_path):
    """ergo's conversion mapping transposes its shared experts (Linear4bit) and router on save: run over packed data
    and QuantState keys, that raised IndexError (the 1-D absmax); they are saved under their own names instead."""
    import torch

    import shims

    q4_requires_fused()
    shims.apply()
    try:
        model = q4_load(ergo_checkpoint)
        want = _forward(model)
        model.save_pretrained(tmp_path / "q4")
        reloaded = q4_load(tmp_path / "q4")
        assert torch.equal(_forward(reloaded), want)
        shared = reloaded.model.layers[-1].mlp.shared_experts.up_proj
        assert type(shared).__name__ == "Linear4bit" and shared.weight.dtype == torch.uint8
    finally:
        shims.restore()
