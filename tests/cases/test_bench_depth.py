"""cases/bench_depth.py: the checkpoint it writes directly in 4 bits is what the shims would write, and loads as a
4-bit load of the same weights; its chunked loss is the model's loss; its runs and the huge-layer check run on CPU."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from cases import bench_depth  # noqa: E402

DIMS = ["--hidden", "64", "--experts", "4", "--moe-intermediate", "48", "--vocab", "256", "--layers", "2"]


def _fused_experts():
    from tests.shims.conftest import lx_fused_experts

    if not lx_fused_experts():
        pytest.skip("transformers 4.x: no fused experts")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    _fused_experts()
    root = tmp_path_factory.mktemp("depth")
    for fmt in ("nf4", "bf16"):
        bench_depth.build(bench_depth.parse_args(["build", str(root / fmt), "--format", fmt, *DIMS]))
    return root


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _load(path, **kwargs):
    import shims
    from transformers import AutoModelForCausalLM

    shims.apply()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()


def test_direct_4bit_build_is_what_shims_save(builds, tmp_path):
    """bf16 build -> shims 4-bit load -> save_pretrained gives the very tensors build --format nf4 wrote."""
    model = _load(builds / "bf16", quantization_config=bench_depth.bnb_config(False))
    model.save_pretrained(tmp_path / "resaved")
    want, got = _tensors(tmp_path / "resaved"), _tensors(builds / "nf4")
    assert sorted(got) == sorted(want)
    different = [k for k in want if want[k].dtype != got[k].dtype or not torch.equal(want[k], got[k])]
    assert different == []
    assert any(k.endswith("experts.gate_up_proj.absmax") for k in got)  # really 4-bit, not two bf16 copies


def test_direct_4bit_build_loads_as_4bit_load_of_same_weights(builds):
    from shims.quant.storage import expert_storage

    direct = _load(builds / "nf4")
    quantized = _load(builds / "bf16", quantization_config=bench_depth.bnb_config(False))
    counts = expert_storage(direct)
    assert counts["quantized"] == counts["expert_tensors"] == 4
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(direct(input_ids=ids).logits, quantized(input_ids=ids).logits)


def test_chunked_loss_is_the_models_loss(builds):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builds / "bf16", dtype=torch.float32).train()
    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    want = model(input_ids=ids, labels=ids).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = bench_depth.chunked_causal_lm_loss(model, ids, chunk_tokens=5)  # 44 targets: 8 chunks + a short one
    got.backward()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    worst = max(float((p.grad - want_grads[n]).abs().max()) for n, p in model.named_parameters())
    assert worst < 1e-6


def test_levers_run_trains_and_exports(builds, tmp_path):
    args = bench_depth.parse_args(["run", str(builds / "nf4"), "--config", "shims-levers", "--seq", "32",
                                   "--steps", "2", "--export", str(tmp_path / "merged"), "--profile", *DIMS])
    out = bench_depth.run(args)
    prof = out["profile"]
    assert prof["clock"] == "cpu" and prof["wall_s"] > 0 and prof["ops"] and prof["total_ms"] >= prof["ops"][0]["ms"] > 0
    assert out["lora_dtypes"] == ["bfloat16"]
    assert out["experts_quantized"] == out["experts_expert_tensors"] == 4
    assert len(out["step_s"]) == 2 and out["losses"][-1] < out["losses"][0]
    assert out["export"]["applied"] == out["export"]["attempted"] == 12  # 2 layers x (2 expert + 4 attention)


def test_huge_layer_checks_pass_at_small_dims(tmp_path, monkeypatch):
    """The DeepSeek-V3-layer check on small dims, with the kernel limit lowered so the split decode runs."""
    _fused_experts()
    from shims.quant import storage

    monkeypatch.setattr(storage, "KERNEL_MAX_ELEMENTS", 64 * 48 * 3)
    from cases.bench_huge import huge_layer

    out = huge_layer(bench_depth.parse_args(["huge", str(tmp_path), "--seq", "16", *DIMS[:6]]))
    assert out["storage_exact"] == {"gate_up_proj": True, "down_proj": True}
    assert out["forward_max_abs"] == 0.0
    assert out["lora_b_moved"] and out["export_exact"], out
