"""Expert LoRA layout detection, peft's per-expert convention and adapter conversion."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shims.adapters import adapter_convert, lora_layout  # noqa: E402

dims = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7))


class _Experts(torch.nn.Module):
    """A bare 3D expert parameter, the way transformers 5.x stores it."""

    def __init__(self, e, d1, d2, transposed=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(e, d1, d2))
        if transposed:
            self.is_transposed = True


class _Holder(torch.nn.Module):
    def __init__(self, e, d1, d2, transposed=False):
        super().__init__()
        self.experts = _Experts(e, d1, d2, transposed)


def _peft_wrapper(e, r, d1, d2, transposed=False, seed=0):
    torch.manual_seed(seed)
    model = peft.get_peft_model(_Holder(e, d1, d2, transposed),
                                peft.LoraConfig(r=r, lora_alpha=3 * r, target_parameters=["experts.weight"],
                                                init_lora_weights=False))
    return model.base_model.model.experts


# ---------------------------------------------------------------- properties of peft's convention
# peft treats a single expert as an ordinary 2D LoRA, so compare against its 3D path with E >= 2
@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(2, 5), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)), st.booleans())
def test_per_expert_slicing_equals_peft_delta(d, transposed):
    e, r, d1, d2 = d
    w = _peft_wrapper(e, r, d1, d2, transposed)
    A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
    flag = bool(getattr(w, "_did_swap_in_out_features", False))
    with torch.no_grad():
        want = w.get_delta_weight("default")
        got = lora_layout.expert_delta(A, B, e, a_on_d2=flag, scaling=w.scaling["default"])
    assert got.shape == want.shape == (e, d1, d2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(dims)
def test_contiguous_b_slicing_is_wrong_for_several_experts(d):
    e, r, d1, d2 = d
    A, B = torch.randn(e * r, d2), torch.randn(d1, e * r)
    right = lora_layout.expert_delta(A, B, e, a_on_d2=True, scaling=1.0)
    wrong = torch.stack([B[:, i * r:(i + 1) * r] @ A[i * r:(i + 1) * r] for i in range(e)])
    if e > 1 and r > 1:
        assert not torch.allclose(right, wrong)
    elif e == 1 or r == 1:
        pass  # the two slicings coincide when there is one expert or rank one


@settings(max_examples=50, deadline=None)
@given(dims)
def test_swap_round_trips_exactly_and_keeps_every_expert_delta(d):
    e, r, d1, d2 = d
    A, B = torch.randn(e * r, d2), torch.randn(d1, e * r)
    A2, B2 = lora_layout.swap_expert_factors(A, B, e)
    assert A2.shape == (e * r, d1) and B2.shape == (d2, e * r)
    assert torch.equal(lora_layout.expert_delta(A2, B2, e, a_on_d2=False, scaling=1.0),
                       lora_layout.expert_delta(A, B, e, a_on_d2=True, scaling=1.0)) or torch.allclose(
        lora_layout.expert_delta(A2, B2, e, a_on_d2=False, scaling=1.0),
        lora_layout.expert_delta(A, B, e, a_on_d2=True, scaling=1.0), rtol=0, atol=1e-5)
    A3, B3 = lora_layout.swap_expert_factors(A2, B2, e)
    assert torch.equal(A3, A) and torch.equal(B3, B)


@settings(max_examples=50, deadline=None)
@given(dims)
def test_stack_is_inverse_of_slicing(d):
    e, r, d1, d2 = d
    A, B = torch.randn(e * r, d2), torch.randn(d1, e * r)
    A2, B2 = lora_layout.stack_expert_factors([lora_layout.expert_factors(A, B, e, i) for i in range(e)])
    assert torch.equal(A, A2) and torch.equal(B, B2)


@settings(max_examples=60, deadline=None)
@given(dims, st.booleans(), st.booleans())
def test_shape_detection_raises_exactly_when_ambiguous(d, a_on_d2, transposed):
    _, _, d1, d2 = d
    a_in, b_out = (d2, d1) if a_on_d2 else (d1, d2)
    if d1 == d2:
        with pytest.raises(lora_layout.AmbiguousLayoutError):
            lora_layout.layout_from_shapes(a_in, b_out, d1, d2, transposed)
    else:
        got = lora_layout.layout_from_shapes(a_in, b_out, d1, d2, transposed)
        assert got == lora_layout.layout_from_flag(a_on_d2, transposed)


def test_version_rules():
    v = lora_layout.layout_from_peft_version
    # (E, out, in) experts: no experts module declares is_transposed
    assert v("0.21.2", False) == v("0.19.1", False) == "standard"
    assert v("0.19.0", False) == v("0.18.1", False) == "swapped"  # 0.19.0 decided the swap wrongly
    # (E, in, out) experts (gpt_oss): peft follows the module's is_transposed, set on 5.x, absent on 4.57
    assert v("0.18.1", True) == "standard"  # 0.18 never swaps, whatever the module says
    assert v("0.19.1", True, declares_transposed=True) == v("0.19.0", True, declares_transposed=False) == "standard"
    assert v("0.19.1", True, declares_transposed=False) == v("0.19.0", True, declares_transposed=True) == "swapped"
    assert v("0.19.1", True) is None  # written on an unknown transformers: the version alone does not say
    assert v("0.21.2", None) is None and v("0.18.1", None) is None and v(None, False) is None
    assert v("0.19.1.dev0", False) is None
    with pytest.raises(ValueError, match="is_transposed"):
        v("0.19.1", False, declares_transposed=True)


@pytest.mark.parametrize("declares", [False, True])
def test_installed_peft_swaps_as_the_version_rule_says(declares):
    # peft decides from the module's is_transposed attribute, not from the parameter's real orientation
    w = _peft_wrapper(4, 2, 6, 10, transposed=declares)
    assert bool(getattr(w, "_did_swap_in_out_features", False)) == lora_layout.peft_a_on_d2(peft.__version__, declares)


@pytest.mark.parametrize("transposed", [False, True])
def test_live_wrapper_layout_matches_its_shapes(transposed):
    e, r, d1, d2 = 4, 2, 6, 10
    w = _peft_wrapper(e, r, d1, d2, transposed)
    A = w.lora_A["default"].weight
    assert lora_layout.wrapper_layout(w) == lora_layout.layout_from_shapes(A.shape[1], w.lora_B["default"].weight.shape[0],
                                                                 d1, d2, transposed)
    if not transposed:
        # peft >= 0.19.1 ("standard") is the only convention with the flag; 0.18 is "swapped" here
        expect = "standard" if hasattr(w, "_did_swap_in_out_features") else "swapped"
        assert lora_layout.wrapper_layout(w) == expect
    else:
        assert lora_layout.wrapper_layout(w) == "standard"


# ---------------------------------------------------------------- saved adapters (fused experts, 5.x)
def _train_like_adapter(tiny_moe, model_type, tmp_path, **dims):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x has no fused expert parameters")
    base = tiny_moe(model_type, dtype=torch.float32, **dims)
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(tmp_path / "src")
    return model


def _expert_wrappers(model):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"}


def test_detect_and_convert_saved_adapter_keeps_logits(tmp_path, tiny_moe):
    model = _train_like_adapter(tiny_moe, "qwen3_moe", tmp_path)
    base_cfg = model.base_model.model.config
    found = adapter_convert.detect_adapter_layout(tmp_path / "src", base_config=base_cfg)
    live = {w.parameter_name: lora_layout.wrapper_layout(w) for w in _expert_wrappers(model).values()}
    assert len(found) == 4 and {i.param for i in found.values()} == {"gate_up_proj", "down_proj"}
    assert all(info.layout == live[info.param] for info in found.values())
    assert set(live.values()) == {lora_layout.expected_layout(model)} == {lora_layout.expected_layout(base_cfg)}

    other = "swapped" if live["down_proj"] == "standard" else "standard"
    rec = adapter_convert.convert_adapter(tmp_path / "src", tmp_path / "other", to=other, base_config=base_cfg)
    assert rec["converted"] == 4
    assert all(i.layout == other for i in adapter_convert.detect_adapter_layout(tmp_path / "other").values())
    adapter_convert.convert_adapter(tmp_path / "other", tmp_path / "back", to=live["down_proj"], base_config=base_cfg)
    from safetensors.torch import load_file

    src, back = load_file(str(tmp_path / "src/adapter_model.safetensors")), load_file(
        str(tmp_path / "back/adapter_model.safetensors"))
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)

    # Every expert delta of the converted adapter, read with the other convention, equals peft's own delta.
    conv = load_file(str(tmp_path / "other/adapter_model.safetensors"))
    for name, w in _expert_wrappers(model).items():
        flag = bool(getattr(w, "_did_swap_in_out_features", False))
        got = lora_layout.expert_delta(conv[f"{name}.lora_A.weight"], conv[f"{name}.lora_B.weight"], 4,
                                  a_on_d2=not flag, scaling=w.scaling["default"])
        with torch.no_grad():
            torch.testing.assert_close(got, w.get_delta_weight("default"), rtol=1e-6, atol=1e-6)
    if not all(hasattr(w, "_did_swap_in_out_features") for w in _expert_wrappers(model).values()):
        return  # peft 0.18 has only one convention: it cannot hold the other layout for a logits check
    # The converted adapter, installed the way the other peft convention would hold it, gives the same logits.
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    _install_as_other_convention(model, conv)
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max().item() < 1e-5, (got - want).abs().max()


def _install_as_other_convention(model, state):
    for name, w in _expert_wrappers(model).items():
        A, B = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        w.lora_A["default"] = torch.nn.Linear(A.shape[1], A.shape[0], bias=False)
        w.lora_B["default"] = torch.nn.Linear(B.shape[1], B.shape[0], bias=False)
        w.lora_A["default"].weight.data.copy_(A)
        w.lora_B["default"].weight.data.copy_(B)
        w._did_swap_in_out_features = not getattr(w, "_did_swap_in_out_features", False)
        w.in_features, w.out_features = A.shape[1], B.shape[0]


def test_ambiguous_square_adapter_without_version_raises(tmp_path, tiny_moe):
    # 2I == H (I=32, H=64): gate_up LoRA shapes are the same in both layouts
    model = _train_like_adapter(tiny_moe, "qwen3_moe", tmp_path, expert_dim=32)
    cfg_path = tmp_path / "src/adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("peft_version", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lora_layout.AmbiguousLayoutError):
        adapter_convert.detect_adapter_layout(tmp_path / "src", base_config=model.base_model.model.config)
    with pytest.raises(lora_layout.AmbiguousLayoutError):
        adapter_convert.convert_adapter(tmp_path / "src", tmp_path / "dst", to="swapped",
                               base_config=model.base_model.model.config)
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp folder left behind


def test_convert_refuses_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        adapter_convert.convert_adapter(tmp_path, tmp_path / "x", to="standard")
    with pytest.raises(ValueError, match="to must be"):
        adapter_convert.convert_adapter(tmp_path, tmp_path / "x", to="sideways")


# ---------------------------------------------------------------- 4.57 per-expert -> 5.x fused
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fuse_per_expert_adapter_keeps_every_expert_delta(tmp_path, tiny_moe, model_type):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("per-expert expert Linear modules exist only on transformers 4.x")
    base = tiny_moe(model_type, dtype=torch.float32)
    names = ["w1", "w3", "w2"] if model_type == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"] + names,
                                                      init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "src")
    rec = adapter_convert.convert_adapter(tmp_path / "src", tmp_path / "fused", to="fused")
    cfg = json.loads((tmp_path / "fused/adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r".*\.gate_up_proj": 4} and cfg["alpha_pattern"] == {r".*\.gate_up_proj": 6}
    assert set(cfg["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert rec["gate_up_rank"] == 4
    from safetensors.torch import load_file

    fused = load_file(str(tmp_path / "fused/adapter_model.safetensors"))
    moe = "block_sparse_moe" if model_type == "mixtral" else "mlp"
    for layer in range(2):
        src = f"base_model.model.model.layers.{layer}.{moe}.experts"
        dst = f"base_model.model.model.layers.{layer}.mlp.experts"
        mods = dict(model.named_modules())
        for param, key, parts in (("gate_up_proj", f"{dst}.base_layer", names[:2]), ("down_proj", dst, names[2:])):
            A, B = fused[f"{key}.lora_A.weight"], fused[f"{key}.lora_B.weight"]
            s = (3 * len(parts)) / (2 * len(parts))  # alpha' / r' of the fused parameter == alpha / r
            got = lora_layout.expert_delta(A, B, 4, a_on_d2=True, scaling=s)  # standard layout, (E, out, in)
            with torch.no_grad():
                want = torch.stack([torch.cat([mods[f"{src}.{e}.{p}"].get_delta_weight("default") for p in parts])
                                    for e in range(4)])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_regex_target_modules_carry_over_to_fused_unless_they_match_the_experts_module():
    from shims.adapters.adapter_convert import _regex_for_fused

    groups = {"base_model.model.model.layers.0.mlp": {}}
    regex = r"(?:.*\.(q_proj|v_proj))|(?:.*\.experts\.\d+\.(gate_proj|up_proj|down_proj))"
    assert _regex_for_fused(regex, groups) == regex
    with pytest.raises(ValueError, match="matches the fused experts module"):
        _regex_for_fused(r".*experts.*", groups)
    with pytest.raises(ValueError, match="all-linear"):
        _regex_for_fused("all-linear", groups)


# ---------------------------------------------------------------- gpt_oss: (E, in, out) experts, fused on 4.57 too
def _experts_modules(model) -> list:
    from shims.quant.storage import iter_expert_modules

    return [m for _, m in iter_expert_modules(model)]


def _gpt_oss_adapter(tiny_moe, path, declare_transposed=False, **dims):
    """A tiny gpt_oss with an expert LoRA saved at ``path``; ``declare_transposed`` sets is_transposed on its
    experts modules first, which is what peft sees on transformers 5.x (4.57's gpt_oss forward ignores it)."""
    base = tiny_moe("gpt_oss", dtype=torch.float32, **dims)
    if declare_transposed:
        for module in _experts_modules(base):
            module.is_transposed = True
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(base, cfg).eval()
    model.save_pretrained(path)
    return model


_IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("trained_declared", [False, True])
def test_gpt_oss_adapter_moves_between_undeclared_and_declared_is_transposed(tmp_path, tiny_moe, trained_declared):
    """transformers 4.57's gpt_oss experts lack is_transposed, so peft >= 0.19 swaps their LoRA where 5.x's do not
    (and peft 0.18 never swaps). Train on one, convert to expected_layout of the other, load: same logits."""
    target = tiny_moe("gpt_oss", dtype=torch.float32)
    if any(hasattr(m, "is_transposed") for m in _experts_modules(target)):
        pytest.skip("this transformers' gpt_oss declares is_transposed and its forward reads it: cannot toggle it")
    for module in _experts_modules(target):
        module.is_transposed = not trained_declared
    model = _gpt_oss_adapter(tiny_moe, tmp_path / "src", declare_transposed=trained_declared)
    with torch.no_grad():
        want = model(_IDS).logits
    wrappers = _expert_wrappers(model)
    base_cfg = model.base_model.model.config
    found = adapter_convert.detect_adapter_layout(tmp_path / "src", base_config=base_cfg)
    assert {i.layout for i in found.values()} == {lora_layout.wrapper_layout(w, is_transposed=True)
                                                   for w in wrappers.values()}
    assert {i.layout for i in found.values()} == {lora_layout.expected_layout(model)}

    wanted = lora_layout.expected_layout(target)
    adapter = tmp_path / "src"
    if {i.layout for i in found.values()} != {wanted}:
        adapter_convert.convert_adapter(adapter, tmp_path / "dst", to=wanted, base_config=base_cfg)
        adapter = tmp_path / "dst"
        assert {i.layout for i in adapter_convert.detect_adapter_layout(adapter, base_config=base_cfg).values()} == {wanted}
    loaded = peft.PeftModel.from_pretrained(target, adapter).eval()
    with torch.no_grad():
        got = loaded(_IDS).logits
    assert (got - want).abs().max().item() < 1e-5, (got - want).abs().max()


def test_expected_layout_from_a_config_matches_the_live_model(tiny_moe, tmp_path):
    model = _gpt_oss_adapter(tiny_moe, tmp_path / "src")
    base = model.base_model.model
    assert lora_layout.expected_layout(base.config) == lora_layout.expected_layout(base)
    assert lora_layout.expected_layout(base, peft_version="0.18.1") == "standard"  # 0.18 never swaps gpt_oss's LoRA


def test_square_gpt_oss_adapter_of_peft_0_19_is_ambiguous(tmp_path, tiny_moe):
    # 2I == H: gate_up_proj (E, 64, 64) is square, and which layout peft >= 0.19 wrote depends on whether the
    # writer's transformers declared is_transposed, which the adapter does not record: raise, do not guess
    model = _gpt_oss_adapter(tiny_moe, tmp_path / "src", expert_dim=32)
    base_cfg = model.base_model.model.config
    wrappers = _expert_wrappers(model).values()
    if not all(hasattr(w, "_did_swap_in_out_features") for w in wrappers):
        found = adapter_convert.detect_adapter_layout(tmp_path / "src", base_config=base_cfg)  # peft 0.18: never swaps
        assert {i.layout for i in found.values()} == {"standard"}
        assert {lora_layout.wrapper_layout(w, is_transposed=True) for w in wrappers} == {"standard"}
        return
    with pytest.raises(lora_layout.AmbiguousLayoutError, match="gate_up_proj"):
        adapter_convert.detect_adapter_layout(tmp_path / "src", base_config=base_cfg)
