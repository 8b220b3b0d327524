import dataclasses
import ast
import copy
from pathlib import Path

import pytest

from harness.reporting import necessity
from harness.matrix import Cell, MatrixError
from tests.harness.conftest import passing_case, results_doc

REPO = Path(__file__).resolve().parents[3]
C1 = Cell("5.6.2", "0.19.1", "1.4.0", lane=True)
C2 = Cell("4.57.6", "0.18.1", "0.25.1", lane=True)
C3 = Cell("5.5.0", "0.18.1", "1.4.0", lane=True)


def status(name, applied=True, reason="applied", drift=None):
    return {"name": name, "summary": "", "applied": applied, "reason": reason,
            "drift": drift if drift is not None else {f"upstream.{name}": "ok"}}


ALL_APPLIED = [status(n) for n in ("quantize_fused_experts", "weight_converter_kwargs", "all_linear_moe",
                                   "peft_quantized_experts", "peft_merge_quantized_experts")]


def run(cell, mode, cases, statuses=None, native_statuses=None):
    doc = results_doc(cell, mode, cases)
    doc["environment"] = {"device": "cpu"}
    if mode == "on":
        doc["environment"]["shims_status"] = copy.deepcopy(statuses if statuses is not None else ALL_APPLIED)
    if native_statuses is not None:
        doc["environment"]["shims_status_native"] = native_statuses
    doc["_file"] = f"{cell.name}-{mode}.json"
    return doc


def not_4bit(case):
    case["metrics"]["experts_quantized"] = 0
    return case


def unavailable(arch, quant):
    return {"case": f"{arch}/{quant}", "arch": arch, "quant": quant, "metrics": {},
            "stages": {"build": {"status": "unavailable", "reason": "no such arch in 4.57"}}}


@pytest.fixture(scope="module")
def symptoms():
    return necessity.load_symptoms()


def table(docs, symptoms):
    return {shim: {cell: e.label for cell, e in by_cell.items()}
            for shim, by_cell in necessity.necessity(docs, symptoms).items()}


def test_quantize_fused_experts_needed_not_needed_broken(symptoms):
    docs = [
        # C1: natively the fused experts stay float, the shim quantizes them -> needed
        run(C1, "off", [passing_case(), not_4bit(passing_case(quant="nf4")), unavailable("gpt_oss", "nf4")]),
        run(C1, "on", [passing_case(), passing_case(quant="nf4"), unavailable("gpt_oss", "nf4")]),
        # C2: natively already 4-bit -> retirement candidate
        run(C2, "off", [passing_case(quant="nf4"), passing_case("mixtral", "nf4")]),
        run(C2, "on", [passing_case(quant="nf4"), passing_case("mixtral", "nf4")]),
        # C3: one nf4 case still not 4-bit with the shim -> broken, even though another case is fixed
        run(C3, "off", [not_4bit(passing_case(quant="nf4")), not_4bit(passing_case("mixtral", "nf4"))]),
        run(C3, "on", [passing_case(quant="nf4"), not_4bit(passing_case("mixtral", "nf4"))]),
    ]
    t = table(docs, symptoms)["quantize_fused_experts"]
    assert t == {C1.name: "needed (1/1)", C2.name: "not needed here (2/2)", C3.name: "broken (1/2)"}
    entry = necessity.necessity(docs, symptoms)["quantize_fused_experts"][C3.name]
    assert entry.detail == "broken: mixtral/nf4; needed: qwen3_moe/nf4"


def test_stage_symptom_any_quant_and_unexercised_and_precondition(symptoms):
    native_nf4 = not_4bit(passing_case(quant="nf4"))
    native_bf16 = passing_case()
    for case in (native_nf4, native_bf16):
        case["stages"]["adapter_reload"] = {"status": "failed", "error": {"type": "TypeError", "message": "kw"}}
    docs = [run(C1, "off", [native_bf16, native_nf4]),
            run(C1, "on", [passing_case(), passing_case(quant="nf4")])]
    unexercised = {**symptoms, "all_linear_moe": dataclasses.replace(
        symptoms["all_linear_moe"], checks=(), unexercised="no case uses it")}
    t = table(docs, unexercised)
    assert t["weight_converter_kwargs"][C1.name] == "needed (2/2)"
    assert t["all_linear_moe"][C1.name] == "not exercised"
    # natively the experts are not 4-bit, so the native run cannot show what the 4-bit LoRA/merge fixes fix
    assert t["peft_quantized_experts"][C1.name] == "unproven (1/1)"
    assert t["peft_merge_quantized_experts"][C1.name] == "unproven (1/1)"


def test_shim_not_applied_is_na_with_the_status_reason(symptoms):
    statuses = [status("weight_converter_kwargs", applied=False,
                       reason="not needed: transformers has no WeightConverter"),
                status("quantize_fused_experts", applied=False,
                       reason="drift: x.y: missing: x.y not found", drift={"x.y": "missing: x.y not found"})]
    docs = [run(C2, "off", [passing_case()]), run(C2, "on", [passing_case()], statuses)]
    entries = necessity.necessity(docs, symptoms)
    assert entries["weight_converter_kwargs"][C2.name].label == "n/a"
    assert "no WeightConverter" in entries["weight_converter_kwargs"][C2.name].detail
    assert entries["quantize_fused_experts"][C2.name].label == "n/a"


def test_stage_not_reached_natively_is_unproven_and_shimmed_not_reached_is_unproven(symptoms):
    native = passing_case()
    native["stages"]["train"] = {"status": "failed", "error": {}}
    native["stages"]["save_adapter"] = {"status": "skipped", "reason": "needs train"}
    native["stages"]["adapter_reload"] = {"status": "skipped", "reason": "needs save_adapter"}
    docs = [run(C1, "off", [native]), run(C1, "on", [passing_case()])]
    assert table(docs, symptoms)["weight_converter_kwargs"][C1.name] == "unproven (1/1)"


def test_shim_without_declared_symptom_and_shim_missing_from_a_run(symptoms):
    docs = [run(C1, "off", [passing_case()]), run(C1, "on", [passing_case()], ALL_APPLIED + [status("brand_new")]),
            run(C2, "off", [passing_case()]), run(C2, "on", [passing_case()])]
    entries = necessity.necessity(docs, symptoms)
    assert entries["brand_new"][C1.name].label == necessity.UNDECLARED
    assert entries["brand_new"][C2.name] == necessity.Entry("n/a", "not in that run's shims version")


def test_drift_table_shows_missing_and_signature_changes_and_whether_applied():
    statuses = [
        status("quantize_fused_experts"),
        status("weight_converter_kwargs", applied=False, reason="drift: a.B: signature changed: a.B lacks x",
               drift={"a.B": "signature changed: a.B lacks x", "a.C": "ok"}),
        status("peft_quantized_experts", applied=False, reason="drift: p.Q: missing: p.Q not found",
               drift={"p.Q": "missing: p.Q not found"}),
        status("all_linear_moe", drift={}),
    ]
    native_only = [status("quantize_fused_experts", applied=False, reason="not applied: apply() not called",
                          drift={"t.q": "missing: t.q not found"})]
    docs = [run(C1, "on", [passing_case()], statuses), run(C2, "off", [passing_case()], native_statuses=native_only)]
    d = necessity.drift(docs)
    assert d["quantize_fused_experts"][C1.name].label == "ok, applied"
    assert d["weight_converter_kwargs"][C1.name] == necessity.Entry(
        "signature changed, NOT APPLIED (drift)", "a.B: signature changed: a.B lacks x")
    assert d["peft_quantized_experts"][C1.name].label == "missing, NOT APPLIED (drift)"
    assert d["all_linear_moe"][C1.name].label == "ok (no targets), applied"
    assert d["quantize_fused_experts"][C2.name].label == "missing, native run only"
    assert d["weight_converter_kwargs"][C2.name].label == "not recorded"


def test_report_has_necessity_and_drift_sections(tmp_path, matrix):
    pytest.importorskip("pandas")
    pytest.importorskip("tabulate")
    from harness.reporting.report import render
    from harness.results import results_name, write_json_atomic

    for doc in (run(C1, "off", [not_4bit(passing_case(quant="nf4"))]), run(C1, "on", [passing_case(quant="nf4")])):
        doc.pop("_file")
        write_json_atomic(tmp_path / results_name(C1.name, doc["mode"]), doc)
    text = render(tmp_path, matrix)
    necessity_part = text.split("## Shim necessity")[1].split("\n## ")[0]
    row = next(line for line in necessity_part.splitlines() if line.startswith(f"| {C1.name}"))
    header = next(line for line in necessity_part.splitlines() if line.startswith("| cell"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = [c.strip() for c in row.strip("|").split("|")]
    assert dict(zip(cols, vals))["quantize_fused_experts"] == "needed (1/1)"
    assert "## Shim drift" in text and "ok, applied" in text


def test_symptom_table_names_real_rules_and_stages(symptoms):
    tree = ast.parse((REPO / "cases" / "pipeline.py").read_text())
    stages = next(ast.literal_eval(node.value) for node in tree.body
                  if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "STAGES")
    for symptom in symptoms.values():
        for kind, name in symptom.checks:
            if kind == "stage":
                assert name in stages, f"{symptom.shim}: no stage {name!r} in cases/pipeline.py"


def test_bad_symptom_entries_are_rejected(tmp_path):
    bad = tmp_path / "m.toml"
    bad.write_text('[shim_symptoms.x]\nsymptoms = ["rule:no_such_rule"]\n')
    with pytest.raises(MatrixError, match="unknown rule 'no_such_rule'"):
        necessity.load_symptoms(bad)
    bad.write_text('[shim_symptoms.x]\nsymptoms = ["merge"]\n')
    with pytest.raises(MatrixError, match="not 'stage:NAME' or 'rule:NAME'"):
        necessity.load_symptoms(bad)
    bad.write_text('[shim_symptoms.x]\nquant = "nf4"\n')
    with pytest.raises(MatrixError, match="needs symptoms"):
        necessity.load_symptoms(bad)


def test_cell_without_a_shimmed_run_says_so(symptoms):
    docs = [run(C1, "off", [passing_case()], native_statuses=ALL_APPLIED), run(C2, "off", [passing_case()]),
            run(C2, "on", [passing_case()])]
    entries = necessity.necessity(docs, symptoms)
    assert entries["quantize_fused_experts"][C1.name] == necessity.Entry(necessity.NO_RUN)
    assert entries["quantize_fused_experts"][C2.name].label == "n/a"  # bf16 only: no nf4 case to judge
    assert entries["quantize_fused_experts"][C2.name].detail == "no nf4 case ran here"
