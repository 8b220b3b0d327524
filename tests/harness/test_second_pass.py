"""Per-expert adapters in the harness: the verdict rule, the report column, the runner's second pass (stages that
found nothing published when their lane ran are re-run after every lane) and the mutation that runs in a 4.57 cell.

The second pass is driven through a stand-in interpreter (a small script that speaks cases/run_cell.py's event
protocol), so these tests need no ML stack; the real stage runs in tests/harness/test_per_expert_stage.py."""

from __future__ import annotations

import json
import stat
import sys
import textwrap

import pytest

from harness import runner, verdict
from harness.matrix import Cell
from harness.results import AWAITS_PUBLISHERS, write_json_atomic
from tests.harness.conftest import passing_case, results_doc

CELL_457 = Cell("4.57.6", "0.18.1", "0.25.1", lane=True)


def per_expert_ok(case: dict) -> dict:
    case["stages"]["per_expert_adapters"] = {"status": "ok", "seconds": 0.5}
    case["metrics"].update(per_expert_total=3, per_expert_ok=3, per_expert_max_abs=5.7e-6, per_expert_kl_max=1.5e-13,
                           per_expert_lora_modules=24, per_expert_linear_modules=24)
    return case


def awaiting(case: dict) -> dict:
    case["stages"]["per_expert_adapters"] = {"status": "skipped", "reason": "no fused-expert adapter published"}
    case["metrics"][AWAITS_PUBLISHERS] = ["per_expert_adapters"]
    return case


# ---- the verdict rule ------------------------------------------------------------------------------------------------
def test_per_expert_rule_passes_on_exact_logits_with_lora_on_every_expert():
    assert verdict.judge(per_expert_ok(passing_case())) == ("pass", [])


@pytest.mark.parametrize("key,value", [
    ("per_expert_max_abs", 2e-4),            # beyond float-summation noise: a delta moved
    ("per_expert_max_abs", float("nan")),
    ("per_expert_lora_modules", 0),          # natively on 4.57: peft attaches no expert LoRA, silently
    ("per_expert_lora_modules", 16),         # some per-expert modules without LoRA
    ("per_expert_ok", 2),                    # one publication did not load
    ("per_expert_total", 0),
])
def test_per_expert_rule_fails(key, value):
    case = per_expert_ok(passing_case())
    case["metrics"][key] = value
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("rule per_expert_adapter" in r for r in reasons), reasons


def test_a_skipped_per_expert_stage_is_not_judged():
    assert verdict.judge(awaiting(passing_case())) == ("pass", [])


# ---- the report column -----------------------------------------------------------------------------------------------
def test_report_shows_the_per_expert_column_native_and_shims(tmp_path, matrix):
    pytest.importorskip("pandas")
    pytest.importorskip("tabulate")
    from harness.reporting.report import render

    native = per_expert_ok(passing_case())
    native["metrics"].update(per_expert_lora_modules=0, per_expert_max_abs=6.2)
    write_json_atomic(tmp_path / f"{CELL_457.name}__shims-off.json", results_doc(CELL_457, "off", [native]))
    write_json_atomic(tmp_path / f"{CELL_457.name}__shims-on.json",
                      results_doc(CELL_457, "on", [per_expert_ok(passing_case()), awaiting(passing_case("mixtral"))]))
    text = render(tmp_path, matrix)
    assert "per_expert" in text.split("## Details", 1)[1].splitlines()[2]  # a column of the details table
    assert "3/3, LoRA 0/24, |d|<=6.2" in text and "3/3, LoRA 24/24, |d|<=5.7e-06" in text
    assert "awaiting 5.x adapters" in text
    refused = per_expert_ok(passing_case("glm4_moe"))
    refused["metrics"].update(per_expert_ok=0, per_expert_total=1, per_expert_max_abs=None, per_expert_lora_modules=0)
    write_json_atomic(tmp_path / f"{CELL_457.name}__shims-off.json", results_doc(CELL_457, "off", [native, refused]))
    assert "0/1, LoRA 0/24, none loaded" in render(tmp_path, matrix)
    assert "FAIL / pass" in text and "rule per_expert_adapter" in text


# ---- the second pass -------------------------------------------------------------------------------------------------
FAKE_CHILD = r'''
import json, sys
args = sys.argv[sys.argv.index("--spec") + 1:]
spec = json.load(open(args[0]))
events = open(args[args.index("--events") + 1], "a")
calls = open(CALLS, "a")
calls.write(json.dumps({"only_stages": spec.get("only_stages"), "cases": [c["arch"] + "/" + c["quant"]
                                                                           for c in spec["cases"]]}) + "\n")
def emit(**ev):
    events.write(json.dumps(ev) + "\n"); events.flush()
emit(event="process_start", versions={})
for c in spec["cases"]:
    cid = c["arch"] + "/" + c["quant"]
    emit(event="case_start", case=cid)
    stages = {"build": {"status": "ok"}, "per_expert_adapters": {"status": "ok"}}
    metrics = {"per_expert_total": 3, "per_expert_ok": 3, "per_expert_max_abs": 4e-6,
               "per_expert_lora_modules": 24, "per_expert_linear_modules": 24}
    if STILL_NOTHING:
        stages["per_expert_adapters"] = {"status": "skipped", "reason": "still nothing"}
        metrics = {"awaits_publishers": ["per_expert_adapters"]}
    emit(event="case_end", case=cid, record={"case": cid, "arch": c["arch"], "quant": c["quant"], "stages": stages,
         "metrics": {**metrics, "model_cached": True},
         "rerun": {"stages": spec["only_stages"], "metrics": metrics}})
'''


def fake_interpreter(tmp_path, still_nothing=False):
    """An executable that answers ``<it> -m cases.run_cell --spec S --events E`` as the case process would."""
    script = tmp_path / "fake_child.py"
    script.write_text(f"CALLS = {str(tmp_path / 'calls.jsonl')!r}\nSTILL_NOTHING = {still_nothing}\n" + FAKE_CHILD)
    exe = tmp_path / "python"
    exe.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        exec {sys.executable} {script} "$@"
        """))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def lane_run(tmp_path, matrix, cases, python):
    """A 4.57 lane's results file as its first pass left it, registered for the second pass as run_cell does."""
    results = tmp_path / "results" / f"{CELL_457.name}__shims-on.json"
    write_json_atomic(results, results_doc(CELL_457, "on", cases))
    work_root = tmp_path / "work"
    specs = matrix.case_specs(True, [c["arch"] for c in cases], ["bf16"], cache_dir="c", work_dir="w",
                              store_dir=str(work_root / "adapters"))
    reg = runner.register_second_pass(work_root, results, python, specs, work_root / CELL_457.name,
                                      float(matrix.run["case_timeout_s"]))
    return results, work_root, reg


def test_the_second_pass_reruns_only_the_awaiting_stage_of_the_awaiting_cases(tmp_path, matrix):
    python = fake_interpreter(tmp_path)
    cases = [awaiting(passing_case("qwen3_moe")), per_expert_ok(passing_case("mixtral"))]
    results, work_root, reg = lane_run(tmp_path, matrix, cases, python)
    assert reg is not None and [s["arch"] for s in json.loads(reg.read_text())["specs"]] == ["qwen3_moe"]

    (summary,) = runner.run_second_pass(work_root)
    assert summary["cases"] == ["qwen3_moe/bf16"] and summary["stages"] == ["per_expert_adapters"]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls == [{"only_stages": ["per_expert_adapters"], "cases": ["qwen3_moe/bf16"]}]
    doc = json.loads(results.read_text())
    qwen, mixtral = doc["cases"]
    assert qwen["stages"]["per_expert_adapters"]["status"] == "ok"
    assert qwen["stages"]["train"] == cases[0]["stages"]["train"]  # the first pass's other stages are kept
    assert AWAITS_PUBLISHERS not in qwen["metrics"] and qwen["metrics"]["per_expert_max_abs"] == 4e-6
    assert "model_cached" not in qwen["metrics"]  # only what the re-run stage recorded is merged
    assert mixtral == cases[1]
    assert verdict.judge(qwen) == ("pass", [])
    assert doc["second_pass"][0]["cases"] == ["qwen3_moe/bf16"]
    assert not reg.exists() and runner.run_second_pass(work_root) == []  # done once


def test_a_second_pass_that_still_finds_nothing_keeps_the_case_waiting(tmp_path, matrix):
    python = fake_interpreter(tmp_path, still_nothing=True)
    results, work_root, _ = lane_run(tmp_path, matrix, [awaiting(passing_case())], python)
    runner.run_second_pass(work_root)
    (case,) = json.loads(results.read_text())["cases"]
    assert case["stages"]["per_expert_adapters"]["status"] == "skipped"
    assert case["metrics"][AWAITS_PUBLISHERS] == ["per_expert_adapters"]


def test_no_registration_when_nothing_waits_and_a_newer_run_clears_an_old_one(tmp_path, matrix):
    python = fake_interpreter(tmp_path)
    results, work_root, reg = lane_run(tmp_path, matrix, [awaiting(passing_case())], python)
    assert reg.exists()
    _, _, again = lane_run(tmp_path, matrix, [per_expert_ok(passing_case())], python)  # the same lane, re-run
    assert again is None and not reg.exists()


def test_the_results_file_decides_what_still_waits(tmp_path, matrix):
    """A registration whose results file was since rewritten by a first pass that found the adapters: nothing runs."""
    python = fake_interpreter(tmp_path)
    results, work_root, reg = lane_run(tmp_path, matrix, [awaiting(passing_case())], python)
    write_json_atomic(results, results_doc(CELL_457, "on", [per_expert_ok(passing_case())]))
    (summary,) = runner.run_second_pass(work_root)
    assert summary["cases"] == [] and not (tmp_path / "calls.jsonl").exists() and not reg.exists()


def test_a_registration_whose_results_are_gone_is_dropped(tmp_path, matrix):
    results, work_root, reg = lane_run(tmp_path, matrix, [awaiting(passing_case())], fake_interpreter(tmp_path))
    results.unlink()
    (summary,) = runner.run_second_pass(work_root)
    assert summary["cases"] == [] and not reg.exists() and not (tmp_path / "calls.jsonl").exists()


def test_a_crashed_second_pass_is_recorded_at_its_stage(tmp_path, matrix):
    exe = tmp_path / "python"
    exe.write_text("#!/bin/sh\nexit 9\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    results, work_root, _ = lane_run(tmp_path, matrix, [awaiting(passing_case())], str(exe))
    runner.run_second_pass(work_root)
    (case,) = json.loads(results.read_text())["cases"]
    assert case["stages"]["startup"]["status"] == "crashed"
    assert verdict.judge(case)[0] == verdict.ERROR


def test_merge_keeps_other_awaiting_stages():
    record = awaiting(passing_case())
    record["metrics"][AWAITS_PUBLISHERS] = ["foreign_adapters", "per_expert_adapters"]
    new = {"stages": {"build": {"status": "ok"}, "per_expert_adapters": {"status": "ok"}},
           "rerun": {"stages": ["per_expert_adapters"], "metrics": {"per_expert_total": 1}}}
    merged = runner.merge_rerun(record, new, ["per_expert_adapters"])
    assert merged["metrics"][AWAITS_PUBLISHERS] == ["foreign_adapters"]
    assert record["metrics"][AWAITS_PUBLISHERS] == ["foreign_adapters", "per_expert_adapters"]  # input unchanged


# ---- the mutation runs in its own cell -------------------------------------------------------------------------------
def test_the_per_expert_mutation_runs_in_a_457_cell_with_bf16_cases(matrix):
    groups = {g["cell"].name: g for g in matrix.mutation_groups()}
    default = groups.pop(matrix.mutation_cell().name)
    assert "per_expert_gate_up_swapped" not in default["names"]
    (other,) = groups.values()
    assert other["cell"].transformers.startswith("4.") and other["quants"] == ["bf16"]
    assert other["names"] == ["per_expert_gate_up_swapped"]
    only = matrix.mutation_groups(["per_expert_gate_up_swapped"])
    assert [g["cell"].name for g in only] == [other["cell"].name]


def test_the_mutation_is_known_to_the_case_processes():
    pytest.importorskip("torch")
    from cases import mutations as planted

    assert "per_expert_gate_up_swapped" in planted.MUTATIONS
