"""peft_compat patches: reproduce each upstream failure natively, then prove the patch fixes it."""

from __future__ import annotations

import contextlib

import pytest

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from shims.lora import peft_compat  # noqa: E402


def _patch(name):
    return next(p for p in peft_compat.PATCHES if p.name == name)


@contextlib.contextmanager
def installed(name):
    undo = _patch(name).install()
    try:
        yield
    finally:
        undo()


def _lora_config(lora_targets, model_type, **kw):
    modules, params = lora_targets(model_type)
    extra = {"target_parameters": params} if params else {}
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, **extra, **kw)


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_weight_converter_kwargs_fixes_adapter_reload(tmp_path, tiny_moe, lora_targets):
    patch = _patch("weight_converter_kwargs")
    reason = patch.needed()
    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    torch.manual_seed(3)
    trained = peft.get_peft_model(base, _lora_config(lora_targets, "qwen3_moe"))
    ids = _ids()
    with torch.no_grad():
        want = trained(ids).logits
    trained.save_pretrained(tmp_path / "adapter")

    def reload():
        fresh = tiny_moe("qwen3_moe", dtype=torch.float32)
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        with torch.no_grad():
            return loaded(ids).logits

    if reason is None:
        # Bug B reproduced natively: peft passes keywords that this WeightConverter rejects.
        with pytest.raises(TypeError, match="distributed_operation"):
            reload()
        with installed("weight_converter_kwargs"):
            got = reload()
        # and the undo really restores upstream behaviour
        with pytest.raises(TypeError, match="distributed_operation"):
            reload()
    else:
        got = reload()
    assert torch.equal(got, want), (got - want).abs().max()


def test_weight_converter_patch_applies_the_keywords():
    if _patch("weight_converter_kwargs").needed() is not None:
        pytest.skip(f"not needed here: {_patch('weight_converter_kwargs').needed()}")
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    marker = object()
    with installed("weight_converter_kwargs"):
        conv = WeightConverter(["a.*.w1.weight", "a.*.w3.weight"], ["a.gate_up_proj"],
                               operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
                               distributed_operation=marker, quantization_operation=None)
        assert conv.distributed_operation is marker
        assert conv.quantization_operation is None
    with pytest.raises(TypeError):
        WeightConverter(["a.*.w1.weight"], ["a.gate_up_proj"], operations=[MergeModulelist(dim=0)],
                        distributed_operation=marker)


def test_weight_converter_not_needed_reason_is_true():
    reason = _patch("weight_converter_kwargs").needed()
    if reason is None:
        pytest.skip("needed on this version (covered by the reload test)")
    try:
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        assert "4.x" in reason
        return
    import inspect

    accepts = "distributed_operation" in inspect.signature(WeightConverter.__init__).parameters
    assert accepts == ("accepts" in reason)


@pytest.mark.slow
def test_all_linear_moe(tiny_moe):
    patch = _patch("all_linear_moe")
    reason = patch.needed()

    def build():
        base = tiny_moe("qwen3_moe", dtype=torch.float32)
        return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules="all-linear"))

    if reason is None:
        # Bug C reproduced natively: the string is split into characters.
        with pytest.raises(ValueError, match="not found"):
            build()
        with installed("all_linear_moe"):
            model = build()
    else:
        model = build()
    names = {n for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert any(".self_attn.q_proj." in n for n in names)
    assert any(".self_attn.o_proj." in n for n in names)
    assert not any("lm_head" in n for n in names)


def test_patches_report_why_not_needed():
    for patch in peft_compat.PATCHES:
        reason = patch.needed()
        assert reason is None or (isinstance(reason, str) and reason)


def test_patches_idempotent_and_reversible_via_registry():
    from shims.registry import Registry

    needed_before = {p.name: p.needed() is None for p in peft_compat.PATCHES}
    reg = Registry(peft_compat.PATCHES)
    first = {s.name: s.applied for s in reg.apply()}
    second = {s.name: s.applied for s in reg.apply()}
    assert first == second == needed_before
    # once installed, the feature probes see fixed behaviour
    assert all(_patch(name).needed() is not None for name in first)
    if first.get("weight_converter_kwargs"):
        from transformers.core_model_loading import WeightConverter

        assert getattr(WeightConverter.__init__, "__shims_patched__", False)
        reg.restore()
        assert not getattr(WeightConverter.__init__, "__shims_patched__", False)
    reg.restore()
