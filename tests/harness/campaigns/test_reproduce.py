"""The kernel-variation check's comparison: identical verdicts pass, any rule or stage that moves is named."""

import copy
import os

from harness.campaigns import reproduce
from harness.matrix import Cell
from tests.harness.conftest import passing_case, results_doc

CELL = Cell("5.25.0", "0.22.0", "1.16.0", lane=True)


def _docs(*cases):
    return [results_doc(CELL, "on", list(cases))]


def test_identical_runs_are_the_same_and_moved_values_are_counted():
    a = passing_case(quant="nf4-recipe")
    b = copy.deepcopy(a)
    b["metrics"]["kl_export"] *= 1.3  # a reported-only bf16 value moved with the kernels
    result = reproduce.compare({"x": _docs(a), "y": _docs(b)})
    assert result.same and result.cases == 1
    assert result.values_moved == 1 and "kl_export" in result.examples[0]


def test_a_rule_that_flips_is_a_difference_naming_it():
    a = passing_case(quant="nf4-recipe")
    b = copy.deepcopy(a)
    b["metrics"]["kl_export_fp32"] = 1e-3
    result = reproduce.compare({"x": _docs(a), "y": _docs(b)})
    assert not result.same
    assert any("rule kl_export_fp32: pass (x) vs fail (y)" in d for d in result.differences), result.differences
    assert any("verdict pass (x) vs fail (y)" in d for d in result.differences)


def test_a_stage_status_or_a_missing_case_is_a_difference():
    a, other = passing_case(quant="nf4"), passing_case(arch="mixtral", quant="nf4")
    b = copy.deepcopy(a)
    b["stages"]["merge"] = {"status": "failed", "error": {"type": "RuntimeError", "message": "x"}}
    result = reproduce.compare({"x": _docs(a, other), "y": _docs(b)})
    assert any("stage merge: ok (x) vs failed (y)" in d for d in result.differences), result.differences
    assert any("mixtral/nf4: only in x" in d for d in result.differences)


def test_no_cases_is_never_the_same():
    assert not reproduce.compare({"x": [], "y": []}).same


def test_environment_is_restored(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with reproduce.environment({"ATEN_CPU_CAPABILITY": "avx2"}):
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ


def test_render_says_same_or_different():
    same = reproduce.compare({"x": _docs(passing_case()), "y": _docs(passing_case())})
    assert "**same**" in reproduce.render(CELL, same, "some CPU")


def test_a_variant_never_runs_more_torch_threads_than_cpus():
    from harness.campaigns import reproduce

    assert reproduce.jobs_for({"MOE_SHIMS_THREADS": "1"}, cpus=2) == 2
    assert reproduce.jobs_for({"MOE_SHIMS_THREADS": "2"}, cpus=2) == 1
    assert reproduce.jobs_for({"MOE_SHIMS_THREADS": "4"}, cpus=2) == 1
    assert all(reproduce.jobs_for(env, cpus=2) * int(env["MOE_SHIMS_THREADS"]) <= 2
               for env in reproduce.VARIANTS.values())
