import json

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("tabulate")

from harness.matrix import Cell  # noqa: E402
from harness.reporting.report import render  # noqa: E402
from harness.results import load_dir, write_json_atomic  # noqa: E402
from harness.runner import write_install_failure  # noqa: E402
from tests.harness.conftest import passing_case, results_doc  # noqa: E402

CELL = Cell("5.6.2", "0.19.1", "1.4.0", lane=True)


def _write(folder, cell, mode, cases, status="ran"):
    write_json_atomic(folder / f"{cell.name}__shims-{mode}.json", results_doc(cell, mode, cases, status))


def test_report_shows_native_failure_and_shimmed_pass(tmp_path, matrix):
    broken = passing_case(quant="nf4")
    broken["metrics"]["experts_quantized"] = 0
    _write(tmp_path, CELL, "off", [passing_case(), broken])
    _write(tmp_path, CELL, "on", [passing_case(), passing_case(quant="nf4")])
    text = render(tmp_path, matrix)
    row = next(line for line in text.splitlines() if line.startswith(f"| {CELL.name}"))
    assert "pass / pass" in row and "FAIL / pass" in row
    assert "rule experts_4bit" in text
    assert "## Verdict rules" in text and "kl_adapter" in text


def test_missing_lanes_are_rows_not_gaps(tmp_path, matrix):
    _write(tmp_path, CELL, "off", [passing_case()])
    text = render(tmp_path, matrix)
    for lane in matrix.lanes:
        assert lane.name in text
    assert "missing" in text
    assert f"{CELL.name} (all)/(all) shims** (missing)" in text


def test_unresolvable_cell_is_a_row_with_the_resolver_message(tmp_path, matrix):
    cell = Cell("5.6.2", "0.19.1", "0.0.1", lane=False)
    write_install_failure(cell, "unresolvable", "No solution found when resolving: trl==0.0.1", tmp_path)
    text = render(tmp_path, matrix)
    assert "unresolvable" in text and "No solution found when resolving: trl==0.0.1" in text


def test_corrupt_truncated_and_foreign_files_are_named_and_the_rest_renders(tmp_path, matrix):
    _write(tmp_path, CELL, "on", [passing_case()])
    good = (tmp_path / f"{CELL.name}__shims-on.json").read_text()
    (tmp_path / "truncated.json").write_text(good[: len(good) // 2])
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "old.json").write_text(json.dumps({**json.loads(good), "schema": 0}))
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "notes.txt").write_text("unrelated")
    docs, problems = load_dir(tmp_path)
    assert len(docs) == 1
    by_file = {p.file.rsplit("/", 1)[-1]: p.problem for p in problems}
    assert "corrupt or truncated" in by_file["truncated.json"]
    assert "not a moe-shims results file" in by_file["foreign.json"]
    assert "schema 0" in by_file["old.json"]
    assert "binary.json" in by_file
    text = render(tmp_path, matrix)
    assert "truncated.json" in text and "pass" in text


def test_crashed_case_row_carries_stage_and_error(tmp_path, matrix):
    killed = {"case": "mixtral/nf4", "arch": "mixtral", "quant": "nf4", "metrics": {},
              "stages": {"train": {"status": "killed", "error": {"type": "killed",
                                                                 "message": "process killed by SIGKILL during stage train"}}}}
    _write(tmp_path, CELL, "on", [passing_case(), killed])
    text = render(tmp_path, matrix)
    assert "ERROR" in text and "SIGKILL during stage train" in text


def test_empty_results_folder_renders_a_clear_page(tmp_path, matrix):
    text = render(tmp_path, matrix)
    assert "missing" in text  # every lane is reported missing
