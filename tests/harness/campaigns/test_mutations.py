"""The harness catches a planted bug: the known upstream merge bug (lora_B sliced contiguously per expert)
turns a shimmed case red, while the same case without it is green. Real case processes (ML stack needed)."""

import dataclasses
import json
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from harness.campaigns import mutations
from harness import verdict  # noqa: E402
from harness.runner import interpreter_cell, run_cell  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.needs_ml]


def _run(tmp_path, matrix, monkeypatch, mutation):
    if mutation:
        monkeypatch.setenv(mutations.MUTATION_ENV, mutation)
    quick = dataclasses.replace(matrix, run={**matrix.run, "train_steps": 8})
    path = run_cell(interpreter_cell(sys.executable), "on", sys.executable, quick, tmp_path / "r", tmp_path / "w",
                    archs=["qwen3_moe"], quants=["bf16"])
    return json.loads(path.read_text())["cases"][0]


def test_contiguous_lora_b_slicing_is_caught(tmp_path, matrix, monkeypatch):
    case = _run(tmp_path, matrix, monkeypatch, "export_contiguous_lora_b")
    v, reasons = verdict.judge(case)
    assert v == "fail"
    assert any("kl_export_fp32" in r for r in reasons), reasons


def test_the_same_case_without_the_mutation_passes(tmp_path, matrix, monkeypatch):
    case = _run(tmp_path, matrix, monkeypatch, None)
    assert verdict.judge(case) == ("pass", [])


def test_unknown_mutation_is_a_clear_error(monkeypatch):
    from cases import mutations as planted

    monkeypatch.setenv(planted.MUTATION_ENV, "no_such_bug")
    with pytest.raises(ValueError, match="unknown mutation 'no_such_bug'"):
        planted.plant_from_env()
