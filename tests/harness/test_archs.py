"""The discovered-arch set: tiny-config derivation rules and the ARCHS.md rows (every arch a row with a reason)."""

import json

from cases.discover import EXPERTS, TINY, tiny_overrides
from harness import archs
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
    assert "experts_4bit" in rows["olmoe/nf4"] and "missing" in rows["olmoe/nf4"]  # no native result: said so
    assert "AttributeError" in rows["dbrx"]
    assert "aria" not in rows and "aria" in text.split("no causal-LM head")[-1]
