"""The sweep's release selection, feature grid and necessity ranges, and the bisection's search, on fake results."""

import pytest

from harness.campaigns import bisect, sweep
from harness.matrix import Cell, MatrixError
from tests.harness.conftest import passing_case, results_doc

RELEASES = ["5.0.0", "5.1.0", "5.1.1", "5.2.0", "5.3.0", "5.3.1", "5.4.0"]


def test_select_ranges_lists_and_minor_only():
    assert sweep.select("5.1.0..5.3.0", RELEASES, "transformers") == ["5.1.0", "5.1.1", "5.2.0", "5.3.0"]
    assert sweep.select("5.0.0..latest", RELEASES, "transformers", minor_only=True) == [
        "5.0.0", "5.1.1", "5.2.0", "5.3.1", "5.4.0"]
    assert sweep.select("5.4.0,5.0.0,latest", RELEASES, "transformers") == ["5.0.0", "5.4.0"]


def test_select_names_an_unknown_release_and_its_line():
    with pytest.raises(MatrixError, match=r"5\.1\.7 is not a release.*5\.1\.0, 5\.1\.1"):
        sweep.select("5.1.7", RELEASES, "transformers")


def _cell_docs(tf, peft="0.22.0", native_ok=False, shims_ok=True):
    cell = Cell(tf, peft, "1.16.0")
    native, shimmed = passing_case(quant="nf4"), passing_case(quant="nf4")
    if not native_ok:
        native["metrics"]["experts_quantized"] = 0  # bug A: experts stay bf16
    if not shims_ok:
        shimmed["stages"]["merge"] = {"status": "failed", "error": {"type": "RuntimeError", "message": "size"}}
    return [results_doc(cell, "off", [native]), results_doc(cell, "on", [shimmed])]


def test_feature_grid_says_native_and_shims_per_release():
    docs = _cell_docs("5.0.0") + _cell_docs("5.1.0", shims_ok=False)
    rows = sweep.feature_grid(docs)
    assert [r["transformers"] for r in rows] == ["5.0.0", "5.1.0"]
    assert rows[0]["4-bit experts at load"] == "FAIL: rule experts_4bit / ok"
    assert rows[1]["merge"].endswith("/ FAIL: merge failed: RuntimeError size")
    assert rows[0]["QLoRA recipe"] == "- / -"  # no recipe case in these runs


def test_necessity_ranges_merge_consecutive_releases(monkeypatch):
    docs = []
    for tf in ("5.0.0", "5.1.0", "5.2.0"):
        docs += _cell_docs(tf, native_ok=tf == "5.2.0")
    for doc in docs:
        doc["environment"]["shims_status"] = [{"name": "quantize_fused_experts", "applied": True}]
    spans = sweep.necessity_ranges(docs)["quantize_fused_experts"]
    assert spans == [("0.22.0", "5.0.0", "5.1.0", "needed"), ("0.22.0", "5.2.0", "5.2.0", "not needed here")]


def test_bisect_finds_the_first_changed_release_in_log_n_cells(monkeypatch, matrix, tmp_path):
    releases = [f"5.{i}.0" for i in range(16)]
    calls = []

    def fake_run(cell, case, mode, *args):
        calls.append(cell.transformers)
        broken = sweep.version_key(cell.transformers) >= (5, 11, 0)
        return ("fail", "rule experts_4bit") if broken else ("pass", "")

    monkeypatch.setattr(bisect, "_run_one", fake_run)
    pins = {"transformers": "latest", "peft": "0.22.0", "trl": "1.16.0"}
    result = bisect.bisect("qwen3_moe/nf4", "native", "transformers", "5.0.0", "5.15.0", pins, matrix,
                           tmp_path, tmp_path, tmp_path, log=lambda *_: None, releases=releases)
    assert result.first_bad.release == "5.11.0" and result.last_good.release == "5.10.0"
    assert len(calls) <= 2 + 4  # the two ends, then log2(16) halvings
    assert "5.11.0" in result.summary() and "rule experts_4bit" in result.summary()


def test_bisect_with_agreeing_ends_has_nothing_to_find(monkeypatch, matrix, tmp_path):
    monkeypatch.setattr(bisect, "_run_one", lambda *a: ("pass", ""))
    result = bisect.bisect("qwen3_moe/nf4", "shims", "transformers", "5.0.0", "5.3.0",
                           {"transformers": "latest", "peft": "latest", "trl": "latest"}, matrix, tmp_path,
                           tmp_path, tmp_path, log=lambda *_: None, releases=RELEASES)
    assert result.first_bad is None and len(result.steps) == 2 and "no change" in result.summary()


def test_bisect_refuses_an_unknown_case(matrix, tmp_path):
    with pytest.raises(MatrixError, match="unknown arch"):
        bisect.bisect("nope/nf4", "native", "transformers", "5.0.0", "5.3.0", {}, matrix, tmp_path, tmp_path,
                      tmp_path, releases=RELEASES)


def test_bisect_on_one_stage_finds_a_shims_symptom(monkeypatch, matrix, tmp_path):
    """Natively the case fails on every release (experts stay bf16); its adapter_reload stage breaks from 5.6.0."""
    def fake_run(cell, case, mode, matrix_, venvs, results, work, arch, quant, check):
        native = passing_case(quant="nf4")
        native["metrics"]["experts_quantized"] = 0
        if sweep.version_key(cell.transformers) >= (5, 6, 0):
            native["stages"]["adapter_reload"] = {"status": "failed", "error": {
                "type": "TypeError", "message": "unexpected keyword argument 'distributed_operation'"}}
        return sweep.case_verdict(results_doc(cell, "off", [native]), "qwen3_moe/nf4", check)

    monkeypatch.setattr(bisect, "_run_one", fake_run)
    releases = ["5.5.0", "5.5.4", "5.6.0", "5.6.1", "5.6.2", "5.7.0"]
    pins = {"transformers": "latest", "peft": "0.19.1", "trl": "1.4.0"}
    verdicts = bisect.bisect("qwen3_moe/nf4", "native", "transformers", "5.5.0", "5.7.0", pins, matrix, tmp_path,
                             tmp_path, tmp_path, log=lambda *_: None, releases=releases)
    assert verdicts.first_bad is None  # the verdict is FAIL at both ends
    staged = bisect.bisect("qwen3_moe/nf4", "native", "transformers", "5.5.0", "5.7.0", pins, matrix, tmp_path,
                           tmp_path, tmp_path, log=lambda *_: None, releases=releases, check="stage:adapter_reload")
    assert staged.first_bad.release == "5.6.0" and "distributed_operation" in staged.first_bad.cause


def test_a_malformed_check_is_refused_before_anything_runs(matrix, tmp_path):
    with pytest.raises(MatrixError, match="stage:NAME or rule:NAME"):
        bisect.bisect("qwen3_moe/nf4", "native", "transformers", "5.0.0", "5.3.0", {}, matrix, tmp_path, tmp_path,
                      tmp_path, releases=RELEASES, check="rule:nonsense")
