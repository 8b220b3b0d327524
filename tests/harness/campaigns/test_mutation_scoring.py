from harness.campaigns.mutations import judge_against


def test_a_case_red_in_the_control_run_catches_nothing():
    control = {"gpt_oss/bf16": ["stage foreign_adapters failed: known gap"]}
    assert not judge_against(control, dict(control))["caught"]


def test_a_newly_red_case_or_a_new_reason_is_caught():
    control = {"gpt_oss/bf16": ["stage foreign_adapters failed: known gap"]}
    newly = judge_against(control, {**control, "qwen3_moe/nf4": ["rule experts_4bit"]})
    assert newly["caught"] and newly["red_cases"][0]["case"] == "qwen3_moe/nf4"
    worse = judge_against(control, {"gpt_oss/bf16": control["gpt_oss/bf16"] + ["rule kl_adapter"]})
    assert worse["caught"] and worse["red_cases"][0]["reasons"] == ["rule kl_adapter"]
