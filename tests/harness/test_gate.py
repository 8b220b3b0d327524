import io
import json

import pytest

from harness import gate, verdict
from harness.__main__ import main
from harness.matrix import Cell
from harness.results import results_name, write_json_atomic
from harness.runner import shims_version, write_install_failure
from tests.harness.conftest import passing_case, results_doc

CASES = (("qwen3_moe", "bf16"), ("qwen3_moe", "nf4"))


def write_run(folder, cell, mode, cases, **extra):
    doc = results_doc(cell, mode, cases)
    doc["shims_version"] = shims_version()
    doc.update(extra)
    path = folder / results_name(cell.name, mode)
    write_json_atomic(path, doc)
    return path


def write_lanes(folder, matrix, skip=()):
    """A complete, all-passing release-lane results set."""
    for lane in matrix.lanes:
        for mode in ("off", "on"):
            if (lane.name, mode) not in skip:
                write_run(folder, lane, mode, [passing_case(a, q) for a, q in CASES])


def edit(folder, cell, mode, change):
    path = folder / results_name(cell.name, mode)
    doc = json.loads(path.read_text())
    change(doc)
    write_json_atomic(path, doc)


@pytest.fixture
def good(tmp_path, matrix):
    results = tmp_path / "results"
    write_lanes(results, matrix)
    baseline = tmp_path / "baseline.json"
    assert gate.accept([results], baseline, out=io.StringIO()) == 0
    return results, baseline


def run_gate(results, baseline, **kw):
    out = io.StringIO()
    code = gate.run([results], baseline, out=out, **kw)
    return code, out.getvalue()


def test_good_results_pass_against_their_own_baseline(good, matrix):
    results, baseline = good
    code, text = run_gate(results, baseline)
    assert code == 0, text
    n_lanes = len(matrix.lanes)
    assert f"{2 * n_lanes} results files" in text
    assert f"{2 * n_lanes} lane runs checked" in text
    assert f"{2 * n_lanes * len(CASES)} cases compared with baseline" in text


def test_baseline_is_compact_and_reevaluates_every_rule_like_the_full_record(good):
    _, baseline = good
    doc = json.loads(baseline.read_text())
    assert doc["kind"] == gate.BASELINE_KIND and doc["schema"] == gate.BASELINE_SCHEMA
    assert doc["shims_version"] == shims_version()
    cell = next(iter(doc["cells"]))
    for arch, quant in CASES:
        entry = doc["cells"][cell]["on"]["cases"][f"{arch}/{quant}"]
        assert entry["verdict"] == "pass" and set(entry["metrics"]) <= set(gate.KEY_METRICS)
        full = passing_case(arch, quant)
        rebuilt = gate.expand_case(f"{arch}/{quant}", entry)
        for rule in verdict.RULES:
            assert (rule.applies(rebuilt), rule.holds(rebuilt)) == (rule.applies(full), rule.holds(full)), rule.name


def test_every_verdict_rule_declares_the_metrics_the_baseline_keeps():
    assert all(rule.metrics for rule in verdict.RULES)
    assert set(gate.KEY_METRICS) == {m for rule in verdict.RULES for m in rule.metrics}


def test_regressed_case_fails_the_gate_naming_it(good, matrix):
    results, baseline = good
    lane = matrix.lanes[0]

    def crash_train(doc):
        doc["cases"][1]["stages"]["train"] = {"status": "failed", "error": {"type": "RuntimeError",
                                                                            "message": "boom"}}
    edit(results, lane, "on", crash_train)
    code, text = run_gate(results, baseline)
    assert code == 1
    assert f"regressed: {lane.name} shims-on qwen3_moe/nf4: pass -> fail" in text
    assert "stage train failed: RuntimeError: boom" in text


def test_metric_out_of_bounds_fails_naming_rule_and_values(good, matrix):
    results, baseline = good
    lane = matrix.lanes[2]
    bound = verdict.KL_ADAPTER_MAX

    def drift_kl(doc):
        doc["cases"][0]["metrics"]["kl_adapter"] = bound * 10
    edit(results, lane, "off", drift_kl)
    code, text = run_gate(results, baseline)
    assert code == 1
    line = next(l for l in text.splitlines() if "out of bounds" in l)
    assert f"{lane.name} shims-off qwen3_moe/bf16: rule kl_adapter" in line
    assert f"kl_adapter={bound * 10}" in line and "baseline kl_adapter=0.0" in line


def test_metric_within_bounds_but_different_passes(good, matrix):
    results, baseline = good

    def nudge(doc):
        doc["cases"][0]["metrics"]["kl_adapter"] = verdict.KL_ADAPTER_MAX / 2
    edit(results, matrix.lanes[0], "on", nudge)
    assert run_gate(results, baseline)[0] == 0


def test_rule_already_broken_in_baseline_is_not_a_new_failure(tmp_path, matrix):
    results = tmp_path / "r"
    write_lanes(results, matrix)
    lane = matrix.lanes[0]

    def native_not_4bit(doc):
        doc["cases"][1]["metrics"]["experts_quantized"] = 0
    edit(results, lane, "off", native_not_4bit)
    baseline = tmp_path / "b.json"
    gate.accept([results], baseline, out=io.StringIO())
    code, text = run_gate(results, baseline)
    assert code == 0, text


def test_missing_lane_fails(tmp_path, matrix):
    results = tmp_path / "r"
    write_lanes(results, matrix)
    baseline = tmp_path / "b.json"
    gate.accept([results], baseline, out=io.StringIO())
    lane = matrix.lanes[3]
    (results / results_name(lane.name, "on")).unlink()
    code, text = run_gate(results, baseline)
    assert code == 1
    assert f"lane: {lane.name} shims-on: no results file" in text


def test_unresolvable_lane_counts_as_did_not_run(good, matrix):
    results, baseline = good
    lane = matrix.lanes[1]
    write_install_failure(lane, "unresolvable", "No solution found when resolving: peft==0.19.1", results)
    code, text = run_gate(results, baseline)
    assert code == 1
    assert f"lane: {lane.name} shims-off: did not run (unresolvable): No solution found" in text
    assert f"regressed: {lane.name} shims-on qwen3_moe/bf16: pass -> did not run (unresolvable)" in text


def test_wrong_shims_version_fails(good, matrix):
    results, baseline = good
    code, text = run_gate(results, baseline, release_version="9.9.9")
    assert code == 1
    assert text.count("version: ") == 2 * len(matrix.lanes)
    assert f"was produced by moe-shims {shims_version()}, the release is 9.9.9" in text


def test_new_shimmed_case_failing_fails_and_new_passing_case_is_counted(good, matrix):
    results, baseline = good
    lane = matrix.lanes[0]
    bad = passing_case("mixtral", "nf4")
    bad["metrics"]["experts_quantized"] = 1

    def add(doc):
        doc["cases"] += [passing_case("mixtral", "bf16"), bad]
    edit(results, lane, "on", add)
    code, text = run_gate(results, baseline)
    assert code == 1
    assert f"new case: {lane.name} shims-on mixtral/nf4 is not in the baseline and is fail" in text
    assert "mixtral/bf16" not in text.split("gate: checked")[0]
    assert "2 new cases (not in baseline)" in text


def test_case_dropped_from_a_lane_is_a_regression(good, matrix):
    results, baseline = good
    lane = matrix.lanes[0]
    edit(results, lane, "off", lambda doc: doc["cases"].pop())
    code, text = run_gate(results, baseline)
    assert code == 1 and f"regressed: {lane.name} shims-off qwen3_moe/nf4: pass -> missing" in text


@pytest.mark.parametrize("schema,word", [(0, "older"), (gate.BASELINE_SCHEMA + 1, "newer")])
def test_baseline_from_another_schema_is_bad_input(good, schema, word):
    results, baseline = good
    doc = json.loads(baseline.read_text())
    doc["schema"] = schema
    baseline.write_text(json.dumps(doc))
    code, text = run_gate(results, baseline)
    assert code == 2
    assert f"has the {word} schema {schema}" in text


def test_unreadable_or_foreign_baseline_is_bad_input(good):
    results, baseline = good
    baseline.write_text('{"kind": "moe-shims/cell-results"}')
    code, text = run_gate(results, baseline)
    assert code == 2 and "is not a moe-shims baseline" in text
    baseline.write_text('{"kind": ')
    code, text = run_gate(results, baseline)
    assert code == 2 and "not readable JSON" in text


def test_empty_results_folder_is_bad_input(tmp_path, good):
    _, baseline = good
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".partial.json.tmp").write_text("{")  # an atomic write in progress does not count
    code, text = run_gate(empty, baseline)
    assert code == 2 and f"results folder {empty} is empty" in text


def test_results_folder_with_unrelated_files_only_is_bad_input(tmp_path, good):
    _, baseline = good
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "other.json").write_text(json.dumps({"hello": "world"}))
    code, text = run_gate(junk, baseline)
    assert code == 2
    assert "holds no moe-shims results files, only 2 unrelated file(s)" in text
    assert "other.json (not a moe-shims results file" in text


def test_conflicting_duplicates_are_bad_input(tmp_path, good, matrix):
    results, baseline = good
    lane = matrix.lanes[0]
    other = tmp_path / "machine-b"
    broken = passing_case("qwen3_moe", "nf4")
    broken["metrics"]["kl_adapter"] = 1.0
    write_run(other, lane, "on", [passing_case("qwen3_moe", "bf16"), broken],
              machine={"host": "gpu-box", "platform": "linux", "cpus": 64})
    out = io.StringIO()
    code = gate.run([results, other], baseline, out=out)
    assert code == 2
    text = out.getvalue()
    assert "conflicting duplicate results" in text
    assert f"{lane.name} shims-on: qwen3_moe/nf4: " in text and "-> pass" in text and "-> fail" in text


def test_agreeing_runs_from_two_machines_pass(tmp_path, good, matrix):
    results, baseline = good
    other = tmp_path / "machine-b"
    write_run(other, matrix.lanes[0], "on", [passing_case(a, q) for a, q in CASES],
              machine={"host": "gpu-box", "platform": "linux", "cpus": 64}, started=1.9e9)
    out = io.StringIO()
    assert gate.run([results, other], baseline, out=out) == 0, out.getvalue()


def test_cli_exit_codes_and_explicit_baseline_command(tmp_path, matrix, capsys):
    results = tmp_path / "r"
    write_lanes(results, matrix)
    baseline = tmp_path / "baseline.json"
    assert main(["gate", "--results", str(results), "--baseline", str(baseline)]) == 2
    assert not baseline.exists(), "the gate never writes a baseline"
    assert main(["baseline", "--results", str(results), "--out", str(baseline)]) == 0
    assert baseline.exists()
    assert main(["gate", "--results", str(results), "--baseline", str(baseline)]) == 0
    edit(results, matrix.lanes[0], "on", lambda doc: doc["cases"][0]["stages"].update(
        merge={"status": "killed", "error": {"type": "killed", "message": "SIGKILL"}}))
    assert main(["gate", "--results", str(results), "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "pass -> error" in out and "gate: FAILED" in out


def test_baseline_refuses_mixed_shims_versions(tmp_path, matrix):
    results = tmp_path / "r"
    write_lanes(results, matrix)
    edit(results, matrix.lanes[0], "on", lambda doc: doc.update(shims_version="0.0.9"))
    out = io.StringIO()
    assert gate.accept([results], tmp_path / "b.json", out=out) == 2
    assert "several moe-shims versions (0.0.9, " in out.getvalue()
    assert not (tmp_path / "b.json").exists()


def test_baseline_cell_outside_the_lanes_missing_now_is_only_a_note(tmp_path, good, matrix):
    results, baseline = good
    adhoc = Cell("5.6.2", "0.19.1", "1.3.0")
    write_run(results, adhoc, "on", [passing_case()])
    gate.accept([results], baseline, out=io.StringIO())
    (results / results_name(adhoc.name, "on")).unlink()
    code, text = run_gate(results, baseline)
    assert code == 0, text
    assert f"note: baseline run {adhoc.name} shims-on (not a release lane) has no current results" in text


def test_noxfile_runs_lanes_in_parallel_and_the_report_after_them():
    registry = pytest.importorskip("nox.registry")
    import runpy

    from harness.runner import REPO

    runpy.run_path(str(REPO / "noxfile.py"))
    sessions = registry.get()
    assert sessions["e2e"].allow_parallel is True
    assert sessions["lanes"].requires == ["e2e"] and not sessions["lanes"].allow_parallel
    assert {"gate", "baseline", "release"} <= set(sessions)
