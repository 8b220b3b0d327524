import pytest

from harness import verdict
from tests.harness.conftest import passing_case


def test_a_complete_case_passes():
    assert verdict.judge(passing_case()) == ("pass", [])
    assert verdict.judge(passing_case(quant="nf4")) == ("pass", [])


@pytest.mark.parametrize("key,value,rule", [
    ("loss_last3", 5.9, "loss_falls"),
    ("grad_norm", 0.0, "grad_norm"),
    ("expert_lora_grad_norm", 0.0, "expert_lora_trains"),
    ("expert_lora_A_moved", 0, "expert_lora_trains"),
    ("kl_export_fp32", 3e-6, "kl_export_fp32"),
    ("samples_export_fp32", "3/4", "samples_export_fp32"),
    ("export_rounding_max_abs", 1e-3, "export_rounding"),
    ("kl_adapter", 2e-5, "kl_adapter"),
    ("kl_merged", float("nan"), "kl_merged"),
    ("export_applied", 20, "export_complete"),
    ("export_quantized", 4, "export_16bit"),
])
def test_each_rule_can_fail(key, value, rule):
    case = passing_case()
    case["metrics"][key] = value
    v, reasons = verdict.judge(case)
    assert v == "fail"
    assert any(f"rule {rule}" in r for r in reasons)


def test_a_complete_recipe_case_passes():
    assert verdict.judge(passing_case(quant="nf4-recipe")) == ("pass", [])


@pytest.mark.parametrize("quant,key,value,rule", [
    ("nf4", "gc_grad_max_abs", 1e-7, "gc_grads_equal"),
    ("nf4", "gc_layer_calls", 1, "gc_grads_equal"),  # checkpointing never recomputed: nothing was compared
    ("nf4-recipe", "gc_grad_max_abs", 1e-3, "gc_grads_equal"),
    ("nf4-recipe", "train_layer_calls_per_step", 1.0, "recipe_checkpointing"),
    ("nf4-recipe", "optim_state_8bit", 3, "recipe_optimizer_8bit"),
    ("nf4-recipe", "kl_export_fp32", 3e-6, "kl_export_fp32"),  # against the float32 twin: held like fp32 cases
    ("nf4-recipe", "experts_quantized", 2, "experts_4bit"),
])
def test_each_recipe_and_checkpointing_rule_can_fail(quant, key, value, rule):
    case = passing_case(quant=quant)
    case["metrics"][key] = value
    v, reasons = verdict.judge(case)
    assert v == "fail" and any(f"rule {rule}" in r for r in reasons), reasons


def test_fast_path_bound_is_float32_rounding_of_the_reordered_operations():
    """2^-24 x S x max |logit|: no tuned constant; qwen3_moe's tiny model (S = 700, |logit| <= 8.8) gets 3.7e-4."""
    m = passing_case(quant="nf4")["metrics"]
    assert verdict.fast_path_bound(m) == 2.0 ** -24 * 700 * 8.8
    assert verdict.fast_path_bound({}) is None


@pytest.mark.parametrize("update", [
    {"fast_vs_peft_max_abs": 6.6},  # the mutation fast_lora_contiguous_lora_b measured 6.6 (qwen3_moe) .. 9.9 (gpt_oss)
    {"fast_vs_peft_max_abs": 2.0 ** -24 * 700 * 8.8 * 1.001},  # just outside the bound
    {"fast_vs_peft_max_abs": float("nan")},
    {"fast_vs_peft_logit_max": float("inf")},
    {"fast_path_calls": 0},  # the fast path did not run: peft's path compared with itself
    {"fast_path_calls": 1},  # one of the two fast-path modules did not run it
    {"fast_path_calls_disabled": 2},  # ENABLED = False did not turn it off
    {"fast_path_experts": 0, "fast_path_summands": 0, "fast_path_calls": 0, "fast_vs_peft_max_abs": 1e-9},
])
def test_fast_path_rule_can_fail(update):
    case = passing_case(quant="nf4")
    case["metrics"].update(update)
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("rule fast_path_equals_peft" in r for r in reasons), reasons


def test_fast_path_rule_holds_for_refused_experts_only_with_identical_logits():
    """ergo: every experts class refused, both runs are peft's path: S = 0, so the bound is 0 and d must be 0."""
    case = passing_case(quant="nf4")
    case["metrics"].update(fast_path_experts=0, fast_path_summands=0, fast_path_calls=0, fast_vs_peft_max_abs=0.0,
                           fast_path_refused=["ErgoExperts defines its own forward"])
    assert verdict.judge(case) == ("pass", [])


def test_fast_path_rule_applies_only_where_the_stage_measured_it():
    for quant in ("bf16", "nf4-recipe"):  # no fast path on float experts; the recipe computes in bf16
        case = passing_case(quant=quant)
        assert "fast_vs_peft_max_abs" not in case["metrics"] and verdict.judge(case) == ("pass", [])
    case = passing_case(quant="nf4")
    case["stages"]["fast_path"] = {"status": "skipped", "reason": "no expert ParamWrapper"}
    case["metrics"]["fast_vs_peft_max_abs"] = 6.6
    assert verdict.judge(case) == ("pass", [])


def test_recipe_optimizer_fallback_passes_only_with_every_reason_recorded():
    case = passing_case(quant="nf4-recipe")
    case["metrics"].update(optim="adamw_torch", optim_state_8bit=0, optim_state_eligible=0,
                           optim_fallbacks=["paged_adamw_8bit on cpu: RuntimeError: no kernel"])
    assert any("recipe_optimizer_8bit" in r for r in verdict.judge(case)[1])  # one of two reasons missing
    case["metrics"]["optim_fallbacks"].append("adamw_bnb_8bit on cpu: RuntimeError: no kernel")
    assert verdict.judge(case) == ("pass", [])


def test_bf16_values_are_reported_never_gated():
    """A bf16 KL moves with the CPU's bf16 kernels: no value of one may change a verdict."""
    case = passing_case(quant="nf4-recipe")
    case["metrics"].update({key: 5.0 for key in (*verdict.REPORTED_ONLY, *verdict.REPORTED_WHERE_NOT_FP32)})
    case["metrics"]["kl_base"] = 6.0  # kl_merged stays ordered below it (merge_moves_4bit)
    assert verdict.judge(case) == ("pass", [])


def test_no_rule_reads_a_reported_only_value_alone():
    for rule in verdict.RULES:
        reported = set(rule.metrics) & set(verdict.REPORTED_ONLY)
        # an ordering between two reported values (merge_moves_4bit, export_carries_adapter) is exact, not a bound
        assert not reported or {"kl_base"} <= reported, (rule.name, reported)


def _native_recipe_case():
    case = passing_case(quant="nf4-recipe")
    for key in ("export_attempted", "export_applied", "kl_export_fp32", "samples_export_fp32",
                "export_rounding_max_abs"):
        case["metrics"].pop(key, None)
    return case


def test_native_recipe_export_must_carry_the_adapter():
    case = _native_recipe_case()
    assert verdict.judge(case) == ("pass", [])
    case["metrics"]["kl_export"] = case["metrics"]["kl_base"]  # as far from the trained model as the base is
    assert any("rule export_carries_adapter" in r for r in verdict.judge(case)[1])


def test_foreign_adapter_kl_is_judged_by_the_verdict():
    case = passing_case()
    case["stages"]["foreign_adapters"] = {"status": "ok"}
    case["metrics"].update(foreign_ok=2, foreign_total=2, kl_foreign_max=0.0)
    assert verdict.judge(case) == ("pass", [])
    case["metrics"]["kl_foreign_max"] = 3e-5
    assert any("rule kl_foreign" in r for r in verdict.judge(case)[1])


def test_prequantized_roundtrip_must_keep_4bit_experts_and_logits():
    for key, value in (("prequantized_experts_quantized", 0), ("prequantized_max_abs", 1e-3)):
        case = passing_case(quant="nf4")
        case["metrics"][key] = value
        v, reasons = verdict.judge(case)
        assert v == "fail" and any("prequantized_roundtrip" in r for r in reasons)


def test_unquantized_experts_fail_nf4_only():
    case = passing_case(quant="nf4")
    case["metrics"]["experts_quantized"] = 0
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("experts_4bit" in r for r in reasons)
    bf16 = passing_case()
    assert verdict.judge(bf16)[0] == "pass"


def test_failed_stage_is_reported_with_type_and_message():
    case = passing_case()
    case["stages"]["adapter_reload"] = {"status": "failed", "error": {"type": "TypeError", "message": "boom"}}
    del case["metrics"]["kl_adapter"]
    v, reasons = verdict.judge(case)
    assert v == "fail" and reasons[0].startswith("stage adapter_reload failed: TypeError: boom")


@pytest.mark.parametrize("status", ["timeout", "killed", "crashed"])
def test_aborted_stages_are_errors(status):
    case = passing_case()
    case["stages"] = {"train": {"status": status, "error": {"type": status, "message": "x"}}}
    assert verdict.judge(case)[0] == "error"


def test_unavailable_arch_is_not_applicable():
    case = passing_case()
    case["stages"] = {"build": {"status": "unavailable", "reason": "no model type"}}
    assert verdict.judge(case) == ("n/a", ["no model type"])


def test_missing_metric_fails_rather_than_passes():
    case = passing_case()
    del case["metrics"]["kl_export_fp32"]
    assert verdict.judge(case)[0] == "fail"


def native_case() -> dict:
    """Native runs export with the merged model's save_pretrained and report no applied/attempted counts."""
    case = passing_case()
    for key in ("export_applied", "export_attempted", "kl_export_fp32", "samples_export_fp32",
                "export_rounding_max_abs"):
        del case["metrics"][key]
    return case


def test_native_export_is_judged_on_its_reload():
    assert verdict.judge(native_case()) == ("pass", [])
    for key, value, rule in (("kl_export", 3e-3, "kl_export"), ("samples_export", "3/4", "samples_export")):
        case = native_case()
        case["metrics"][key] = value
        v, reasons = verdict.judge(case)
        assert v == "fail" and any(f"rule {rule}" in r for r in reasons)


def test_every_rule_declares_the_metrics_it_reads():
    for rule in verdict.RULES:
        assert rule.metrics, rule.name
        case = passing_case()
        trimmed = {**case, "metrics": {k: v for k, v in case["metrics"].items() if k in rule.metrics}}
        if rule.applies(case):
            assert rule.holds(trimmed), f"{rule.name} reads a metric it does not declare"


def test_a_4bit_merge_that_dropped_its_deltas_fails():
    case = passing_case(quant="nf4")
    case["metrics"].update(kl_merged=0.5, kl_base=0.5)  # merged == base: nothing was merged
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("merge_moves_4bit" in r for r in reasons)
    case["metrics"].update(kl_merged=0.07)
    assert verdict.judge(case) == ("pass", [])


def test_a_merge_that_skipped_the_experts_fails():
    case = passing_case(quant="nf4")
    case["metrics"].update(merged_experts_total=4, merged_experts_changed=0)
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("merge_changes_experts" in r for r in reasons)
    case["metrics"].update(merged_experts_changed=4)
    assert verdict.judge(case) == ("pass", [])


def test_routers_rule_applies_only_where_router_counts_are_recorded():
    """The case records router counts only for nf4 over fused experts (5.x): elsewhere the rule is silent, so 4.x's
    float routers (gpt_oss, deepseek_v3, glm4_moe) are not judged on it."""
    case = passing_case(quant="nf4")
    assert "routers_routers" not in case["metrics"] and verdict.judge(case)[0] == "pass"
    case["metrics"].update(routers_routers=2, routers_quantized=2)
    assert verdict.judge(case)[0] == "pass"
    case["metrics"].update(routers_quantized=0, routers_kept_wide=2)  # deepseek_v3's float32 routers, bf16 model
    assert verdict.judge(case)[0] == "pass"
    case["metrics"].update(routers_quantized=1, routers_kept_wide=0)
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("rule routers_4bit" in r for r in reasons)


def test_routers_the_cases_skip_modules_keep_float_are_accounted_for():
    """An arch workaround (longcat_flash: llm_int8_skip_modules=["classifier"]) keeps its routers float on
    purpose; a router that is neither 4-bit, nor kept wide, nor skipped still fails."""
    case = passing_case(quant="nf4")
    case["metrics"].update(routers_routers=2, routers_quantized=0, routers_kept_wide=0, routers_skipped=2)
    assert verdict.judge(case)[0] == "pass"
    case["metrics"].update(routers_skipped=1)
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("rule routers_4bit" in r for r in reasons)


def test_prequantized_roundtrip_must_keep_4bit_routers():
    case = passing_case(quant="nf4")
    case["metrics"].update(prequantized_routers_routers=2, prequantized_routers_quantized=0)
    v, reasons = verdict.judge(case)
    assert v == "fail" and any("prequantized_roundtrip" in r for r in reasons)


def _served(case: dict) -> dict:
    """A passing case with the serving stages (nox -s serve) and their metrics as cases/serve.py records them."""
    case["stages"].update(serve_merged={"status": "ok"}, serve_adapters={"status": "ok"})
    case["metrics"].update(kl_serve_fp32=2e-11, samples_serve_fp32="4/4", serve_fp32_vs_resave_max_abs=0.0,
                           serve_bf16_vs_resave_max_abs=0.0, samples_serve_fp32_vs_resave="4/4",
                           samples_serve_bf16_vs_resave="4/4", serve_control_max_abs=2.3e-6,
                           serve_bf16_vs_transformers_max_abs=0.35,
                           serve_adapter_outcomes={"fused": "loads_with_option", "per_expert": "loads"},
                           serve_adapter_predicted={"fused": "loads_with_option", "per_expert": "loads"},
                           serve_adapter_options_predicted={"fused": True})
    return case


def test_a_served_case_passes():
    assert verdict.judge(_served(passing_case(quant="nf4-recipe"))) == ("pass", [])


@pytest.mark.parametrize("key,value,rule", [
    ("kl_serve_fp32", 3e-6, "serve_fp32"),  # e.g. one expert's delta missing from the served export
    ("samples_serve_fp32", "3/4", "serve_fp32"),
    ("serve_fp32_vs_resave_max_abs", 1e-7, "serve_as_transformers_save"),  # the engine reads the folder differently
    ("serve_bf16_vs_resave_max_abs", 0.01, "serve_as_transformers_save"),
    ("samples_serve_bf16_vs_resave", "3/4", "serve_as_transformers_save"),
    ("serve_adapter_predicted", {"fused": "loads", "per_expert": "loads"}, "check_adapter_predicts_engine"),
    ("serve_adapter_predicted", {"fused": "loads_with_option"}, "check_adapter_predicts_engine"),  # one unpredicted
    ("serve_adapter_outcomes", {"fused": "wrong", "per_expert": "loads"}, "check_adapter_predicts_engine"),
    ("serve_adapter_options_predicted", {"fused": False}, "check_adapter_predicts_engine"),  # other flags named
    ("serve_adapter_options_predicted", {}, "check_adapter_predicts_engine"),
])
def test_each_serving_rule_can_fail(key, value, rule):
    case = _served(passing_case(quant="nf4-recipe"))
    case["metrics"][key] = value
    v, reasons = verdict.judge(case)
    assert v == "fail" and any(f"rule {rule}" in r for r in reasons), reasons


def test_serving_values_of_two_libraries_kernels_are_reported_not_gated():
    case = _served(passing_case(quant="nf4-recipe"))
    case["metrics"].update(serve_control_max_abs=1.0, serve_bf16_vs_transformers_max_abs=6.0)
    assert verdict.judge(case) == ("pass", [])
    assert {"serve_control_max_abs", "serve_bf16_vs_transformers_max_abs"} <= set(verdict.REPORTED_ONLY)


def test_a_layout_that_does_not_exist_for_the_arch_needs_no_prediction():
    case = _served(passing_case(quant="nf4-recipe"))
    case["metrics"].update(serve_adapter_outcomes={"fused": "loads", "per_expert": "n/a"},
                           serve_adapter_predicted={"fused": "loads"})
    assert verdict.judge(case) == ("pass", [])
