"""harness/campaigns/bench_depth.py: the plan, merging of several device runs, ratios within one run only, targets that can
fail, and errors that stay rows (no ML needed: documents are built by hand)."""

import pytest

pytest.importorskip("pandas")

from harness.campaigns import bench, bench_depth  # noqa: E402

GIB = 1024 ** 3


def _run(step_s, peak_gib, **extra):
    return {"step_s": step_s, "step_median_s": sorted(step_s)[len(step_s) // 2], "tokens_per_s": 2048 / step_s[0],
            "train_peak": {"gpu": peak_gib * GIB, "gpu_reserved": peak_gib * GIB}, "resident_bytes": 4 * GIB,
            "losses": [12.0, 11.9], "layers": extra.pop("layers", 8), **extra}


def _doc(results, when=0.0):
    names = list(results)
    plan = [s for s in bench_depth.plan(True) if s["name"] in names]
    return {"when": when, "host": "h", "device": "cuda", "full": True, "results": results,
            "plan": [{k: s[k] for k in ("name", "what", "peer") if k in s} for s in plan]}


def test_plan_names_and_builds():
    names = [s["name"] for s in bench_depth.plan(True)]
    assert names[0] == "build" and "shims-levers-48" in names and "peer-tf457-8" in names
    assert bench_depth._needed_build(next(s for s in bench_depth.plan(True) if s["name"] == "huge-layer")) is None
    assert bench_depth._needed_build(next(s for s in bench_depth.plan(True) if s["name"] == "peer-e4b-8")) == "build-hub"


def test_targets_fail_when_missed_and_pass_when_met():
    good = _doc({"shims-levers-48": _run([1.0, 1.0, 1.0], 19.0, layers=48),
                 "shims-levers-24": _run([0.5, 0.5, 0.5], 10.0, layers=24), "bf16-levers-24": _run([0.48] * 3, 30.0)})
    met = {t["target"]: t["met"] for t in bench_depth._targets(good)}
    assert met["48 layers, shims + levers: train peak (allocated)"] == "yes"
    assert met["24 layers: shims step / bf16 step (median, same levers)"] == "yes"
    bad = _doc({"shims-levers-48": _run([1.0] * 3, 21.0, layers=48),
                "shims-levers-24": _run([0.6] * 3, 10.0, layers=24), "bf16-levers-24": _run([0.48] * 3, 30.0)})
    met = {t["target"]: t["met"] for t in bench_depth._targets(bad)}
    assert met["48 layers, shims + levers: train peak (allocated)"] == "**no**"
    assert met["24 layers: shims step / bf16 step (median, same levers)"] == "**no**"


def test_merge_keeps_every_run_and_ratios_stay_within_a_run():
    first = _doc({"peer-shims-8": _run([0.2] * 3, 5.0), "peer-e4b-8": _run([2.0] * 3, 5.0),
                  "huge-layer": {"error": "exit 1: Error invalid argument"}}, when=1.0)
    second = _doc({"peer-shims-8": _run([0.1] * 3, 5.0), "peer-e4b-8": _run([0.4] * 3, 5.0),
                   "huge-layer": {"storage_exact": {"gate_up_proj": True}, "forward_max_abs": 0.0,
                                  "lora_b_moved": True, "export_exact": True}}, when=2.0)
    merged = bench_depth.merge_docs([first, second])
    assert merged["results"]["peer-e4b-8"]["run"] == 2 and merged["results"]["peer-e4b-8 (run 1)"]["run"] == 1
    ratios = bench_depth._peer_ratios(merged)
    assert "- peer-e4b-8 (run 1) / peer-shims-8 (run 1): train peak 1.00x, step 10.00x, resident 1.00x" in ratios
    assert "- peer-e4b-8 / peer-shims-8: train peak 1.00x, step 4.00x, resident 1.00x" in ratios
    text = bench_depth.render(merged)
    assert "earlier attempt, huge-layer (run 1): exit 1: Error invalid argument" in text


def test_merge_refuses_runs_of_different_devices():
    cpu = {**_doc({}), "device": "cpu"}
    with pytest.raises(ValueError, match="different devices"):
        bench_depth.merge_docs([_doc({}), cpu])


def test_error_line_names_the_exception():
    out = "Traceback (most recent call last):\n  File x\n    y\ntorch.OutOfMemoryError: CUDA out of memory.\n"
    assert bench.error_line(out) == "torch.OutOfMemoryError: CUDA out of memory."
    assert bench_depth._short("exit 1: ^^^ | torch.OutOfMemoryError: CUDA out") == "torch.OutOfMemoryError: CUDA out"


def test_profiled_steps_render_side_by_side():
    prof = {"wall_s": 0.5, "clock": "device", "total_ms": 480.0,
            "ops": [{"name": "kDequantizeBlockwise", "calls": 96, "ms": 40.0}, {"name": "gemm", "calls": 10, "ms": 9.0}]}
    bf16 = {**prof, "ops": [{"name": "gemm", "calls": 12, "ms": 11.0}]}
    text = bench_depth.render(_doc({"shims-levers-24": _run([0.5] * 3, 10.0, layers=24, profile=prof),
                                    "bf16-levers-24": _run([0.45] * 3, 30.0, profile=bf16)}))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith(("| gemm", "| kDequant"))}
    assert rows == {"kDequantizeBlockwise": ["40.0 (96)", ""], "gemm": ["9.0 (10)", "11.0 (12)"]}


def test_partial_run_renders():
    """The report is rewritten after every run: a plan whose peers have not run yet still renders."""
    doc = _doc({"build": {"format": "nf4", "layers": 48}})
    doc["plan"] = [{k: s[k] for k in ("name", "what", "peer") if k in s} for s in bench_depth.plan(True)]
    text = bench_depth.render(doc)
    assert "- peer-e4b-8: not run" in text
