"""adapter_model_keys: an adapter saved by peft reloads as saved, even where the arch's checkpoint conversion has a
renaming that also matches names the model itself uses (inkling2: ``sconv.weight_proj`` -> ``sconv.weight_proj.weight``).

Natively peft (>= 0.19, transformers 5.x) runs those renamings over the adapter's keys on load: the LoRA of such a
module is loaded under a name no parameter has, peft only warns, and the reloaded adapter keeps its fresh init there.
References are exact: the logits of the PeftModel that was saved.
"""

from __future__ import annotations

import contextlib

import pytest

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from shims.lora import peft_compat  # noqa: E402

PATCH = next(p for p in peft_compat.PATCHES if p.name == "adapter_model_keys")
# peft 0.19.x on transformers >= 5.6 cannot load an MoE arch's adapter at all without this one (Bug B)
CONVERTER_KWARGS = next(p for p in peft_compat.PATCHES if p.name == "weight_converter_kwargs")


@contextlib.contextmanager
def installed(patch=PATCH):
    undo = patch.install()
    try:
        yield
    finally:
        undo()


@pytest.fixture(autouse=True)
def adapters_load():
    """Bug B's fix where this peft needs it, so that "native" below means: only adapter_model_keys missing."""
    if CONVERTER_KWARGS.needed() is not None:
        yield
        return
    with installed(CONVERTER_KWARGS):
        yield


def _needed():
    reason = PATCH.needed()
    if reason is not None:
        pytest.skip(f"not needed here: {reason}")


def _ids():
    return torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def _save_random_lora(model, config, path):
    torch.manual_seed(3)
    trained = peft.get_peft_model(model, config).eval()
    with torch.no_grad():
        want = trained(_ids()).logits
    trained.save_pretrained(path)
    return want


def _reload(build, path):
    loaded = peft.PeftModel.from_pretrained(build(), path).eval()
    with torch.no_grad():
        return loaded(_ids()).logits


# inkling2_text as cases/discover.py derives its tiny config (transformers 5.24)
_INKLING2 = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=128, initializer_range=0.2, moe_intermediate_size=24,
                 n_routed_experts=4, num_experts_per_tok=2, unpadded_vocab_size=128,
                 layer_types=["hybrid_sliding", "hybrid"], eos_token_id=2)


@pytest.mark.slow
def test_inkling2_weight_proj_lora_is_lost_natively_and_reloads_exactly_with_the_patch(tmp_path):
    """The arch where it was found (archs report: kl_adapter 1e-4 .. 7e-3): the dynamic short convolution's
    ``weight_proj`` LoRA of the full-attention layer."""
    _needed()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model("inkling2_text", **_INKLING2)
    except (ValueError, KeyError) as exc:
        pytest.skip(f"transformers has no inkling2_text: {exc}")

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(linear|sink_proj|weight_proj)",
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)
    want = _save_random_lora(build(), lora, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(".sconv.weight_proj.lora_A." in k for k in saved)  # the keys the conversion renames
    with pytest.warns(UserWarning, match="weight_proj"):
        native = _reload(build, tmp_path)
    assert not torch.equal(native, want)  # the weight_proj LoRA did not load: the exact check below would fail
    with installed():
        got = _reload(build, tmp_path)
    assert torch.equal(got, want), (got - want).abs().max()


def test_a_renaming_that_matches_model_names_no_longer_rewrites_saved_keys(tmp_path, tiny_moe, lora_targets,
                                                                            monkeypatch):
    """The same situation planted on qwen3_moe (any lane where peft converts adapters): a renaming, written for
    checkpoint names, whose pattern also matches the model's ``self_attn.q_proj`` (as inkling2's ``weight_proj``
    one does). Keys in the model's naming load as saved; keys that need the conversion still get it."""
    _needed()
    import peft.utils.transformers_weight_conversion as conversion
    from transformers.core_model_loading import WeightRenaming

    original = conversion.get_model_conversion_mapping

    def with_checkpoint_renaming(model, *args, **kwargs):
        return [*(original(model, *args, **kwargs) or []),
                WeightRenaming(source_patterns=r"self_attn\.q_proj", target_patterns=r"self_attn.q_proj.inner")]

    modules, params = lora_targets("qwen3_moe")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False,
                             **({"target_parameters": params} if params else {}))
    want = _save_random_lora(tiny_moe("qwen3_moe", dtype=torch.float32), config, tmp_path)

    def build():
        return tiny_moe("qwen3_moe", dtype=torch.float32)

    monkeypatch.setattr(conversion, "get_model_conversion_mapping", with_checkpoint_renaming)
    with pytest.warns(UserWarning, match="q_proj"):
        native = _reload(build, tmp_path)
    assert not torch.equal(native, want)
    with installed():
        assert torch.equal(_reload(build, tmp_path), want)


def test_keys_that_need_the_conversion_still_get_it():
    """The wrapper passes only keys that name a LoRA tensor of the model through unchanged; the others go to peft's
    conversion, and a conflict between the two is an error, not a silent pick."""
    _needed()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Module()
            self.proj.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})

    model = Tiny()
    assert peft_compat.serialized_lora_keys(model, "default") == {"proj.lora_A.weight"}
    seen = {}

    def fake_convert(model, peft_config, adapter_state_dict, adapter_name="default"):
        seen.update(adapter_state_dict)
        return {k.replace("old_proj", "proj"): v for k, v in adapter_state_dict.items()}

    import peft.utils.transformers_weight_conversion as conversion

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conversion, "convert_peft_adapter_state_dict_for_transformers", fake_convert)
        with installed():
            convert = conversion.convert_peft_adapter_state_dict_for_transformers
            a, b = torch.zeros(2, 4), torch.ones(2, 4)
            out = convert(model=model, peft_config=None, adapter_state_dict={"proj.lora_A.weight": a,
                                                                             "other.lora_B.weight": b})
            assert set(seen) == {"other.lora_B.weight"} and out["proj.lora_A.weight"] is a
            with pytest.raises(peft_compat.AdapterKeyConflict, match="proj.lora_A.weight"):
                convert(model=model, peft_config=None, adapter_state_dict={"proj.lora_A.weight": a,
                                                                           "old_proj.lora_A.weight": b})
