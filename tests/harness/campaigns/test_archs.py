"""The discovered-arch set: tiny-config derivation rules and the ARCHS.md rows (every arch a row with a reason)."""

import json

from cases.discover import EXPERTS, OVERRIDES, TINY, repaired, tiny_overrides
from harness.campaigns import archs
from harness.matrix import Cell
from tests.harness.conftest import passing_case, results_doc


def test_only_attributes_the_config_carries_are_shrunk():
    defaults = {"hidden_size": 4096, "num_local_experts": 64, "moe_intermediate_size": 1408, "intermediate_size": 11008,
                "vocab_size": 151936, "pad_token_id": 151643, "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "text_config": {"hidden_size": 2048, "n_routed_experts": 256}}
    out = tiny_overrides(defaults)
    assert out["hidden_size"] == TINY["hidden_size"] and out["num_local_experts"] == EXPERTS
    assert 2 * out["moe_intermediate_size"] != out["hidden_size"]  # layout mistakes must not hide
    assert out["intermediate_size"] != out["moe_intermediate_size"]  # a dense MLP beside the experts
    assert out["pad_token_id"] < out["vocab_size"]
    assert out["layer_types"] == ["sliding_attention", "full_attention"]  # the arch's mix, two layers
    assert out["text_config"]["n_routed_experts"] == EXPERTS and out["text_config"]["hidden_size"] == 64
    assert "num_experts" not in out and "q_lora_rank" not in out


def test_experts_width_is_intermediate_size_when_there_is_no_separate_moe_width():
    out = tiny_overrides({"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8})
    assert 2 * out["intermediate_size"] != out["hidden_size"]


def test_every_discovered_arch_is_a_row_with_its_reason(tmp_path):
    doc = {"transformers": "5.24.0", "archs": [
        {"name": "qwen3_moe", "model_type": "qwen3_moe", "config": {}, "attention": ["q_proj"]},
        {"name": "olmoe", "model_type": "olmoe", "config": {}, "attention": ["q_proj"]},
        {"name": "dbrx", "model_type": "dbrx", "skip": "tiny config does not build: AttributeError: x"},
        {"name": "aria", "model_type": "aria", "skip": "no causal-LM head (not in AutoModelForCausalLM): ..."},
    ]}
    results = tmp_path / "results"
    results.mkdir()
    failing = passing_case("olmoe", "nf4")
    failing["metrics"]["experts_quantized"] = 1
    cell = Cell("5.24.0", "0.21.2", "1.16.0")
    for mode, cases in (("off", [passing_case("qwen3_moe", "nf4")]), ("on", [passing_case("qwen3_moe", "nf4"), failing])):
        (results / f"x__shims-{mode}.json").write_text(json.dumps(results_doc(cell, mode, cases)))
    out = archs.write_report(doc, results, tmp_path / "ARCHS.md", ["nf4"])
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "pass" in rows["qwen3_moe/nf4"]
    assert "2/2 fast, 3.6e-06 <= 3.7e-04" in rows["qwen3_moe/nf4"]  # rule fast_path_equals_peft: its value and bound
    assert "Lane: transformers 5.24.0, peft 0.21.2, trl 1.16.0, torch 2.13.0." in text
    assert "experts_4bit" in rows["olmoe/nf4"] and "missing" in rows["olmoe/nf4"]  # no native result: said so
    assert "AttributeError" in rows["dbrx"]
    assert "aria" not in rows and "aria" in text.split("no causal-LM head")[-1]


def test_every_sub_config_and_every_layer_kind_list_is_shrunk():
    defaults = {"d_model": 6144, "n_layers": 28, "zero_expert_num": 256, "num_shared_experts": 2,
                "mlp_layer_types": ["dense"] + ["sparse"] * 27,
                "attn_config": {"kv_n_heads": 8, "hidden_size": 6144},
                "ffn_config": {"hidden_size": 6144, "moe_num_experts": 16, "moe_top_k": 4}}
    out = tiny_overrides(defaults)
    assert out["mlp_layer_types"] == ["dense", "sparse"] and out["n_layers"] == 2
    assert out["zero_expert_num"] == EXPERTS  # extra experts in the routed stack count too, shared ones do not
    assert out["num_shared_experts"] == TINY["num_shared_experts"]
    assert out["ffn_config"]["moe_num_experts"] == EXPERTS and out["ffn_config"]["moe_top_k"] == TINY["top_k"]
    assert out["attn_config"]["hidden_size"] == TINY["hidden_size"]


def test_sizes_other_sizes_determine_are_recomputed():
    out = tiny_overrides({"hidden_size": 4096, "mamba_n_heads": 128, "mamba_d_head": 64, "mamba_expand": 2,
                          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "qk_head_dim": 192})
    assert out["mamba_n_heads"] * out["mamba_d_head"] == out["mamba_expand"] * out["hidden_size"]
    assert out["qk_head_dim"] == out["qk_nope_head_dim"] + out["qk_rope_head_dim"]


def _validator_error(message: str) -> Exception:
    # the shape of huggingface_hub's StrictDataclassClassValidationError text: the cause on its own line
    return ValueError(f"Class validation error for validator 'validate_architecture':\n    ValueError: {message}")


def test_validator_messages_are_repaired_where_the_config_carries_the_sizes():
    overrides = {"hidden_size": 64, "text_config": {"num_attention_heads": 4, "num_key_value_heads": 2},
                 "vision_config": {"hidden_size": 32, "adapter_in_dim": 1536}}
    fixed = repaired(overrides, _validator_error("num_key_value_heads must match num_attention_heads"))
    assert fixed["text_config"]["num_key_value_heads"] == 4 and "num_key_value_heads" not in fixed
    fixed = repaired(overrides, _validator_error("adapter_in_dim must match hidden_size"))
    assert fixed["vision_config"]["adapter_in_dim"] == 32  # the width of the config that carries both
    topk = repaired({"num_experts_per_tok": 2}, _validator_error("ZAYA currently supports `num_experts_per_tok=1` only."))
    assert topk == {"num_experts_per_tok": 1}
    swa = repaired({"head_dim": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8},
                   _validator_error("SWA head_dim must equal qk_nope_head_dim + qk_rope_head_dim"))
    assert swa["head_dim"] == 24


def test_an_unknown_refusal_or_a_repair_that_changes_nothing_is_not_retried():
    assert repaired({"hidden_size": 64}, _validator_error("hidden_size must be divisible by 7")) is None
    assert repaired({"num_experts_per_tok": 1}, _validator_error("supports `num_experts_per_tok=1` only")) is None


def test_every_per_model_override_says_why_no_generic_rule_works():
    for model_type, (values, reason) in OVERRIDES.items():
        assert values and len(reason) > 40, model_type


def test_a_hybrid_keeps_an_attention_layer_and_an_experts_layer():
    # nemotron_h: the first two kinds hold no softmax attention (a hybrid cache without one cannot tell a length)
    out = tiny_overrides({"layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"]})
    assert out["layers_block_type"] == ["moe", "full_attention"]
    # granitemoehybrid: defaults list only linear layers
    out = tiny_overrides({"layer_types": ["linear_attention"] * 40})
    assert out["layer_types"] == ["linear_attention", "full_attention"]
    # two kinds: kept as they are
    out = tiny_overrides({"layer_types": ["linear_attention"] * 3 + ["full_attention"]})
    assert out["layer_types"] == ["linear_attention", "full_attention"]
    assert tiny_overrides({"mlp_layer_types": ["dense", "sparse", "sparse"]})["mlp_layer_types"] == ["dense", "sparse"]


def test_a_logit_multiplier_that_compensates_the_width_is_scaled_with_it():
    out = tiny_overrides({"hidden_size": 8192, "logit_scale": 0.0625})  # cohere2_moe's defaults
    assert out["logit_scale"] == round(0.0625 * (8192 / 64) ** 0.5, 4)
    assert tiny_overrides({"hidden_size": 256, "logit_scale": 0.5})["logit_scale"] == 1.0  # never above 1
    assert "logit_scale" not in tiny_overrides({"hidden_size": 8192, "logit_scale": 1.0})


def _workaround_matrix(table: dict):
    import dataclasses

    from harness.matrix import load_matrix

    matrix = load_matrix()
    return dataclasses.replace(matrix, archs_settings={**matrix.archs_settings, "workarounds": table})


def test_a_workaround_reaches_only_its_arch_and_only_bitsandbytes_loads():
    skip = {"llm_int8_skip_modules": ["classifier"]}
    matrix = _workaround_matrix({"longcat_flash": {"bnb": skip, "why": "its router reads classifier.weight"}})
    doc = {"archs": [{"name": n, "model_type": n, "config": {"hidden_size": 64}, "attention": ["q_proj"]}
                     for n in ("longcat_flash", "qwen3_moe")]}
    sub = archs.discovered_matrix(matrix, doc)
    specs = {(s["arch"], s["quant"]): s for s in sub.case_specs(True, quants=["bf16", "nf4"], cache_dir="c",
                                                                  work_dir="w")}
    assert specs[("longcat_flash", "nf4")]["quant_spec"]["bnb"]["llm_int8_skip_modules"] == ["classifier"]
    assert specs[("longcat_flash", "nf4")]["quant_spec"]["bnb"]["load_in_4bit"]  # added to, not replacing, nf4
    assert "llm_int8_skip_modules" not in specs[("qwen3_moe", "nf4")]["quant_spec"]["bnb"]
    assert "bnb" not in specs[("longcat_flash", "bf16")]["quant_spec"]
    assert "llm_int8_skip_modules" not in matrix.quants["nf4"]["bnb"]  # the shared quantization is not changed


def test_a_workaround_without_its_reason_is_refused():
    import pytest

    from harness.matrix import MatrixError

    with pytest.raises(MatrixError, match="why"):
        archs.workarounds(_workaround_matrix({"x": {"bnb": {"llm_int8_skip_modules": ["gate"]}}}))


def test_rows_name_the_workaround_and_the_notes_say_why(tmp_path):
    fixes = {"longcat_flash": {"bnb": {"llm_int8_skip_modules": ["classifier"]}, "why": "UPSTREAM ROUTER CAUSE"},
             "switch_transformers": {"bnb": {"llm_int8_skip_modules": ["wo"]}, "why": "UPSTREAM CAST CAUSE"}}
    doc = {"transformers": "5.24.0", "archs": [
        {"name": "longcat_flash", "model_type": "longcat_flash", "config": {}, "attention": ["q_proj"]},
        {"name": "dbrx", "model_type": "dbrx", "config": {}, "attention": ["Wqkv"], "override": "DBRX REASON"},
    ]}
    info = archs.RunInfo(125.0, 2, ["longcat_flash"])
    text = archs.write_report(doc, tmp_path / "none", tmp_path / "ARCHS.md", ["nf4"], fixes, info).read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "llm_int8_skip_modules=['classifier']" in rows["longcat_flash/nf4"]
    assert "tiny config: override" in rows["dbrx/nf4"]
    assert "UPSTREAM ROUTER CAUSE" in text and "DBRX REASON" in text
    assert "switch_transformers** (not run here" in text and "UPSTREAM CAST CAUSE" in text  # users' workaround
    assert "2 min 5 s" in text and "--only" in text and archs.SCHEDULE in text


def test_the_schedule_the_report_claims_is_the_workflows():
    """ARCHS.md says the weekly e2e workflow runs nox -s archs: the workflow must have that job."""
    from pathlib import Path

    workflow = (Path(archs.REPO) / ".github" / "workflows" / "e2e.yml").read_text()
    assert "schedule:" in workflow and "nox -s archs" in workflow.split("\n  archs:")[1]


def test_attention_targets_are_plain_projections_found_by_path_or_by_class():
    import torch

    from cases.discover import attention_projections

    class Grouped(torch.nn.Linear):  # deepseek_v4's o_a_proj: its own forward, no plain x W^T
        def forward(self, x):
            return x

    class MixerAttention(torch.nn.Module):  # nemotron_h: attention under a "mixer" path
        def __init__(self):
            super().__init__()
            self.q_proj, self.o_a_proj = torch.nn.Linear(4, 4), Grouped(4, 4)

    model = torch.nn.Module()
    model.mixer = MixerAttention()
    model.mlp = torch.nn.Module()
    model.mlp.up_proj = torch.nn.Linear(4, 4)
    assert attention_projections(model) == ["q_proj"]


def test_a_fast_path_that_breaks_its_bound_is_a_red_row_naming_the_rule(tmp_path):
    doc = {"transformers": "5.25.0", "archs": [{"name": "qwen3_moe", "model_type": "qwen3_moe", "config": {}}]}
    results = tmp_path / "results"
    results.mkdir()
    broken = passing_case("qwen3_moe", "nf4")
    broken["metrics"]["fast_vs_peft_max_abs"] = 6.6
    (results / "x__shims-on.json").write_text(json.dumps(results_doc(Cell("5.25.0", "0.22.0", "1.16.0"), "on",
                                                                     [broken])))
    text = archs.write_report(doc, results, tmp_path / "ARCHS.md", ["nf4"]).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| qwen3_moe/nf4"))
    assert "6.6e+00 <= 3.7e-04" in row and "rule fast_path_equals_peft" in row


def test_archs_runs_on_a_named_release_lane_with_its_own_report(matrix):
    import pytest

    from harness import cli
    from harness.matrix import MatrixError

    assert cli.archs_cell(None, matrix) == matrix.archs_cell()
    lane = matrix.lanes[-2]
    assert cli.archs_cell(lane.name, matrix) == lane
    results, report = archs.report_paths(lane, matrix)
    assert report.name == f"ARCHS-{lane.name}.md" and results.name == f"archs-{lane.name}"
    assert archs.report_paths(matrix.archs_cell(), matrix)[1].name == "ARCHS.md"
    with pytest.raises(MatrixError, match="not a release lane"):
        cli.archs_cell("tf9.9.9-peft0.0.1-trl0.0.1", matrix)
    opts = cli.parse_with(cli.archs_parser(), ["qwen3_moe,ergo", "--lane", lane.name])
    assert opts.only == ["qwen3_moe,ergo"] and opts.lane == lane.name
