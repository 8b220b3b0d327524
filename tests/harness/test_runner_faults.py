"""Real faults in real case processes: a SIGKILL mid-stage, a hang past the timeout and a crash.

Runs cases/run_cell.py with this interpreter, so it needs the ML stack (the `tests` nox sessions have it).
"""

import dataclasses
import json
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from harness.matrix import Cell  # noqa: E402
from harness.runner import run_cell  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.needs_ml]


def test_kill_hang_and_crash_each_become_a_row_and_the_rest_still_runs(tmp_path, matrix, monkeypatch):
    faults = ["qwen3_moe/bf16:train:kill", "qwen3_moe/nf4:load:hang", "mixtral/bf16:lora:crash"]
    monkeypatch.setenv("MOE_SHIMS_INJECT_FAULT", ";".join(faults))
    quick = dataclasses.replace(matrix, run={**matrix.run, "train_steps": 4, "case_timeout_s": 45})
    cell = Cell("0.0", "0.0", "0.0")
    path = run_cell(cell, "off", sys.executable, quick, tmp_path / "results", tmp_path / "work",
                    archs=["qwen3_moe", "mixtral"], quants=["bf16", "nf4"])
    doc = json.loads(path.read_text())
    cases = {c["case"]: c for c in doc["cases"]}
    assert list(cases) == ["qwen3_moe/bf16", "qwen3_moe/nf4", "mixtral/bf16", "mixtral/nf4"]

    killed = cases["qwen3_moe/bf16"]["stages"]["train"]
    assert killed["status"] == "killed" and "SIGKILL during stage train" in killed["error"]["message"]

    hung = cases["qwen3_moe/nf4"]["stages"]["load"]
    assert hung["status"] == "timeout" and "45 s limit" in hung["error"]["message"]

    crashed = cases["mixtral/bf16"]["stages"]["lora"]
    assert crashed["status"] == "crashed" and "exited with code 70" in crashed["error"]["message"]

    survivor = cases["mixtral/nf4"]["stages"]
    assert survivor["train"]["status"] == "ok" and survivor["adapter_reload"]["status"] == "ok"
    assert doc["processes"] == 4  # one fresh child after each fault
