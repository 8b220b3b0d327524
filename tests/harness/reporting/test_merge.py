import json
import shutil

import pytest

from harness.matrix import Cell
from harness.reporting.merge import load_many
from harness.results import results_name, write_json_atomic
from tests.harness.conftest import passing_case, results_doc

A = Cell("5.6.2", "0.19.1", "1.4.0", lane=True)
B = Cell("5.5.0", "0.18.1", "1.4.0", lane=True)


def write(folder, cell, mode, cases, host="ci-1", started=1.8e9, device=None):
    doc = results_doc(cell, mode, cases)
    doc["machine"]["host"], doc["started"] = host, started
    if device:
        doc["environment"] = {"device": "cuda", "device_name": device}
    write_json_atomic(folder / results_name(cell.name, mode), doc)


def failing_nf4():
    case = passing_case(quant="nf4")
    case["metrics"]["experts_quantized"] = 0
    return case


def test_identical_duplicates_count_once_and_distinct_runs_are_all_kept(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write(one, A, "on", [passing_case()])
    write(one, B, "on", [passing_case()])
    shutil.copytree(one, two)                                   # the same runs downloaded twice
    write(two, A, "off", [passing_case()], host="gpu-box")      # a run only the second folder has
    merged = load_many([one, two])
    assert sorted((d["cell"]["name"], d["mode"]) for d in merged.docs) == sorted(
        [(A.name, "on"), (B.name, "on"), (A.name, "off")])
    assert len(merged.duplicates) == 2
    assert all(dropped.startswith(str(two)) for dropped, _kept in merged.duplicates)
    assert merged.conflicts == []


def test_same_cell_and_mode_on_two_machines_with_different_verdicts_is_a_conflict(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write(one, A, "on", [passing_case(), passing_case(quant="nf4")], host="ci-1")
    write(two, A, "on", [passing_case(), failing_nf4()], host="gpu-box", device="NVIDIA H100")
    write(two, B, "on", [passing_case()], host="gpu-box")
    merged = load_many([one, two])
    assert len(merged.docs) == 3 and not merged.duplicates
    [conflict] = merged.conflicts
    assert (conflict.cell, conflict.mode) == (A.name, "on")
    assert list(conflict.cases) == ["qwen3_moe/nf4"], "the agreeing bf16 case is not a conflict"
    by_run = conflict.cases["qwen3_moe/nf4"]
    assert sorted(by_run.values()) == ["fail", "pass"]
    assert any(who.startswith("gpu-box (NVIDIA H100)") for who in by_run)


def test_same_cell_on_two_machines_agreeing_is_not_a_conflict(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    write(one, A, "on", [passing_case()], host="ci-1")
    write(two, A, "on", [passing_case()], host="gpu-box")
    merged = load_many([one, two])
    assert len(merged.docs) == 2 and merged.conflicts == [] and merged.duplicates == []


def test_report_merges_folders_labels_rows_and_lists_conflicts(tmp_path, matrix):
    pytest.importorskip("pandas")
    pytest.importorskip("tabulate")
    from harness.reporting.report import render

    one, two = tmp_path / "one", tmp_path / "two"
    write(one, A, "on", [passing_case(), passing_case(quant="nf4")], host="ci-1")
    write(two, A, "on", [passing_case(), failing_nf4()], host="gpu-box", device="NVIDIA H100")
    write(two, A, "off", [passing_case(), failing_nf4()], host="gpu-box", device="NVIDIA H100")
    shutil.copy(two / results_name(A.name, "off"), one / "copy-of-off.json")  # identical duplicate
    text = render([one, two], matrix)
    conflicts = text.split("## Conflicting results")[1].split("##")[0]
    assert f"**conflict** {A.name} shims-on: qwen3_moe/nf4:" in conflicts
    assert "1 identical duplicate run(s) counted once" in conflicts
    details = text.split("## Details")[1].split("##")[0]
    assert "gpu-box" in details and "cuda (NVIDIA H100)" in details and "ci-1" in details
    summary = text.split("## Summary")[1].split("##")[0]
    assert "FAIL,pass" in summary or "pass,FAIL" in summary  # both verdicts shown, not one hidden


def test_cli_report_accepts_repeated_results(tmp_path, matrix):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    from harness.__main__ import main

    one, two = tmp_path / "one", tmp_path / "two"
    write(one, A, "on", [passing_case()])
    write(two, B, "on", [passing_case()], host="gpu-box")
    out = tmp_path / "out" / "COMPAT.md"
    assert main(["report", "--results", str(one), "--results", str(two), "--out", str(out)]) == 0
    text = out.read_text()
    assert A.name in text and B.name in text and "gpu-box" in text
    assert (out.parent / "heatmap.png").exists() and (out.parent / "history.jsonl").exists()
    assert "](heatmap.png)" in text
