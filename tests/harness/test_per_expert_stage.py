"""The per_expert_adapters stage for real: a transformers 5.x case process (this interpreter) trains and publishes a
fused expert adapter; a transformers 4.57 case process (the 4.57 test lane's venv) loads it natively (no expert
LoRA: the rule breaks) and with the shims after convert_adapter(to="per_expert") (the publisher's logits), and the
planted gate/up swap in that conversion breaks the rule."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

from harness import verdict  # noqa: E402
from harness.runner import CellRun  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.needs_ml]

_REPO = Path(__file__).resolve().parents[2]
_V457_PYTHON = Path(os.environ.get("MOE_SHIMS_V457_PYTHON",
                                   _REPO / ".nox/tests-tf4-57-6-peft0-18-1-trl0-25-1/bin/python"))


@pytest.fixture(scope="module")
def published(tmp_path_factory, matrix):
    """A work root whose store holds this interpreter's (5.x) native qwen3_moe/bf16 adapter."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:  # the publisher must be a 5.x cell (fused experts)
        pytest.skip("this test lane is transformers 4.x: it consumes, the 5.x lanes publish")
    if not _V457_PYTHON.is_file():
        pytest.skip(f"no transformers 4.57 interpreter at {_V457_PYTHON} (set MOE_SHIMS_V457_PYTHON)")
    ready = subprocess.run([str(_V457_PYTHON), "-c", "import torch, transformers, peft"], capture_output=True)
    if ready.returncode != 0:  # the lane's venv exists but is still being installed (test lanes run in parallel)
        pytest.skip(f"the transformers 4.57 interpreter {_V457_PYTHON} cannot import torch/transformers/peft yet")
    root = tmp_path_factory.mktemp("per_expert")
    quick = dataclasses.replace(matrix, run={**matrix.run, "train_steps": 2})
    work = root / "work"
    specs = quick.case_specs(False, ["qwen3_moe"], ["bf16"], cache_dir=str(work / "models"),
                             work_dir=str(root / "publisher"), store_dir=str(work / "adapters"))
    # save_adapter publishes (native runs do); only it and the stages it needs run
    CellRun(sys.executable, specs, root, 240.0, root / "publisher.log", only_stages=["save_adapter"]).run()
    assert list((work / "adapters" / "qwen3_moe-bf16").iterdir()), "the native 5.x run published nothing"
    return root, quick


def _consume(root, matrix, shims_on, monkeypatch, mutation=None):
    """Only the per_expert_adapters stage (as the runner's second pass runs it) in the 4.57 interpreter."""
    if mutation:
        monkeypatch.setenv("MOE_SHIMS_MUTATION", mutation)
    work = root / "work"
    specs = matrix.case_specs(shims_on, ["qwen3_moe"], ["bf16"], cache_dir=str(work / "models"),
                              work_dir=str(root / f"consumer-{shims_on}-{mutation}"), store_dir=str(work / "adapters"))
    folder = root / f"run-{shims_on}-{mutation}"
    folder.mkdir()
    supervisor = CellRun(str(_V457_PYTHON), specs, folder, 240.0, folder / "cell.log",
                         only_stages=["per_expert_adapters"])
    supervisor.run()
    (record,) = supervisor.records.values()
    assert record["rerun"]["stages"] == ["per_expert_adapters"], json.dumps(record)[:2000]
    return record


def _rule_broken(record):
    return any("rule per_expert_adapter" in r for r in verdict.judge(record)[1])


def test_shims_reproduce_the_5x_logits_on_457(published, monkeypatch):
    record = _consume(*published, shims_on=True, monkeypatch=monkeypatch)
    m = record["metrics"]
    assert record["stages"]["per_expert_adapters"]["status"] == "ok", record["stages"]
    assert m["per_expert_total"] == 1 and m["per_expert_lora_modules"] == m["per_expert_linear_modules"] == 24
    assert m["per_expert_max_abs"] <= verdict.PER_EXPERT_MAX_ABS and not _rule_broken(record)


def test_natively_457_attaches_no_expert_lora_and_the_rule_says_so(published, monkeypatch):
    record = _consume(*published, shims_on=False, monkeypatch=monkeypatch)
    assert record["metrics"]["per_expert_lora_modules"] == 0 and _rule_broken(record)


def test_swapped_gate_up_halves_are_caught(published, monkeypatch):
    record = _consume(*published, shims_on=True, monkeypatch=monkeypatch, mutation="per_expert_gate_up_swapped")
    assert record["metrics"]["per_expert_max_abs"] > 1e-2 and _rule_broken(record)
