"""check_adapter / `python -m shims check-adapter`: one test per engine rule (shims.adapters.engine_check.RULES: vLLM 0.34.0,
SGLang 0.5.23, transformers + peft), with synthetic adapters of the exact key names and shapes peft writes (no model
is built), the predicted outcome / options / engine message of each, and the suggested conversion really making the
check pass. Where vLLM is installed, the name handling a rule rests on is also run through vLLM's own loader."""

from __future__ import annotations

import json
import shlex

import pytest

from shims.__main__ import main
from shims.adapters.engine_check import (LOADS, LOADS_WITH_OPTION, OUTCOMES, REFUSED, RULES, SGLANG_VERSION, SILENTLY_IGNORED,
                                SILENTLY_WRONG, UNSUPPORTED, VLLM_MIXED_FORMAT, VLLM_MIXED_FORMAT_2D, VLLM_VERSION,
                                check_adapter)

E, R, H, I = 4, 2, 64, 24  # 2I != H, so the shapes tell the layouts apart
_PREFIX = "base_model.model.model.layers.0"
_PER_EXPERT = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_V4 = ("w1", "w3", "w2")  # gate, up, down
_TF5 = dict(transformers_version="5.24.0", peft_version="0.21.2")
_TESTED_RULES: set[str] = set()  # every rule a test below asserted, checked against RULES at the end


def _base(tmp_path, model_type, architectures=None, hidden=H, inter=I):
    """A base config.json; qwen3_5_moe is the multimodal wrapper with the MoE in text_config, as HF writes it."""
    key = "num_local_experts" if model_type in ("gpt_oss", "mixtral") else "num_experts"
    inter_key = "intermediate_size" if model_type in ("gpt_oss", "mixtral") else "moe_intermediate_size"
    config = {"model_type": model_type, "hidden_size": hidden, key: E, inter_key: inter}
    if model_type == "qwen3_5_moe":
        config = {"model_type": model_type, "text_config": {**config, "model_type": "qwen3_5_moe_text"}}
    if architectures:
        config["architectures"] = architectures
    path = tmp_path / f"{model_type}_{'_'.join(architectures or [])}_{hidden}_base"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _adapter(tmp_path, model_type, form, *, block="mlp", projs=_PER_EXPERT, params=("gate_up_proj", "down_proj"),
             attention=("q_proj", "v_proj"), target_modules=None, architectures=None, hidden=H, inter=I,
             peft_version=None, name=None):
    """A saved adapter with attention LoRA and, per ``form``, per-expert ("per_expert"), fused ("standard" /
    "swapped"), both ("mixed") or no ("none") expert LoRA. ``block``: the module holding the experts; ``projs``:
    per-expert names (gate, up, down, or a subset); ``params``: the fused expert parameters with LoRA, nested as peft
    nests them (the first registered, gate_up_proj, innermost under ``.base_layer``)."""
    import torch
    from safetensors.torch import save_file

    from shims.adapters.lora_layout import ExpertDims

    base = _base(tmp_path, model_type, architectures, hidden, inter)
    tensors = {}
    for proj in attention:
        tensors[f"{_PREFIX}.self_attn.{proj}.lora_A.weight"] = torch.randn(R, hidden)
        tensors[f"{_PREFIX}.self_attn.{proj}.lora_B.weight"] = torch.randn(hidden, R)
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": list(attention),
              "base_model_name_or_path": str(base)}
    if peft_version:
        config["peft_version"] = peft_version
    if form in ("per_expert", "mixed"):
        shapes = dict(zip(_PER_EXPERT, ((inter, hidden), (inter, hidden), (hidden, inter))))
        shapes.update(zip(_MIXTRAL_V4, list(shapes.values())))
        for e in range(E):
            for proj in projs:
                out, inp = shapes[proj]
                tensors[f"{_PREFIX}.{block}.experts.{e}.{proj}.lora_A.weight"] = torch.randn(R, inp)
                tensors[f"{_PREFIX}.{block}.experts.{e}.{proj}.lora_B.weight"] = torch.randn(out, R)
        config["target_modules"] += list(projs)
    if form in ("standard", "swapped", "mixed"):
        dims = ExpertDims(E, hidden, inter, model_type == "gpt_oss")
        nesting = len(params) - 1
        for depth, param in enumerate(params):
            prefix = f"{_PREFIX}.{block}.experts" + ".base_layer" * (nesting - depth)
            d1, d2 = dims.param_shape(param)
            a_on_d2 = (form != "swapped") != dims.is_transposed  # lora_layout.layout_from_flag, inverted
            a_in, b_out = (d2, d1) if a_on_d2 else (d1, d2)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(E * R, a_in)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(b_out, E * R)
        config["target_parameters"] = [f"{block}.experts.{param}" for param in params]
    if target_modules is not None:
        config["target_modules"] = target_modules
    path = tmp_path / (name or f"{model_type}_{form}_{block}")
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _check(adapter, engine, rule, outcome, **kw):
    verdict = check_adapter(adapter, engine, **kw)
    assert (verdict.rule, verdict.outcome) == (rule, outcome), verdict.reason
    assert verdict.compatible == (outcome == LOADS) and verdict.exit_code == (0 if outcome == LOADS else 1)
    assert verdict.cites == RULES[rule].cites and verdict.cites
    if engine != "transformers":
        assert "read from source, the engine itself is not run here" in verdict.source
        assert verdict.engine_version == {"vllm": VLLM_VERSION, "sglang": SGLANG_VERSION}[engine]
    _TESTED_RULES.add(rule)
    return verdict


def _run_fix(verdict, capsys=None) -> str:
    """Run the printed conversion command(s) through the CLI; returns the last output folder."""
    assert verdict.conversion
    out = None
    for command in verdict.conversion.split(" && "):
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "shims"]
        assert main(argv[3:]) == 0
        out = argv[5]
    if capsys is not None:
        capsys.readouterr()
    return out


def test_versions_the_rules_were_read_from():
    assert (VLLM_VERSION, SGLANG_VERSION) == ("0.34.0", "0.5.23")
    for rule in RULES.values():
        assert rule.outcome in OUTCOMES and rule.cites
        if rule.engine != "transformers":
            version = VLLM_VERSION if rule.engine == "vllm" else SGLANG_VERSION
            assert all(cite.endswith(f" {version}") and (".py" in cite) for cite in rule.cites), rule


# -- vLLM 0.34.0 ---------------------------------------------------------------------------------------------------
def test_vllm_no_expert_lora(tmp_path):
    verdict = _check(_adapter(tmp_path, "qwen3_moe", "none"), "vllm", "vllm_no_expert_lora", LOADS)
    assert verdict.found == "none" and verdict.conversion is None


@pytest.mark.parametrize("model_type,block,projs", [
    ("qwen3_moe", "mlp", _PER_EXPERT),
    ("mixtral", "block_sparse_moe", _MIXTRAL_V4),     # transformers 4.57's mixtral names, vLLM's own
    ("mixtral", "block_sparse_moe", _PER_EXPERT),     # mixtral's hf_to_vllm_mapper renames gate_proj -> w1 ...
    ("deepseek_v3", "mlp", _PER_EXPERT),
    ("glm4_moe", "mlp", _PER_EXPERT),
])
def test_vllm_per_expert_loads(tmp_path, model_type, block, projs):
    verdict = _check(_adapter(tmp_path, model_type, "per_expert", block=block, projs=projs), "vllm", "vllm_per_expert",
                     LOADS)
    assert (verdict.needed, verdict.options, verdict.conversion) == ("per_expert", None, None)


def test_vllm_per_expert_under_another_block_is_silently_ignored(tmp_path, capsys):
    """mixtral per-expert LoRA named like the other archs (mlp.experts.N.gate_proj): vLLM's loader accepts the names
    (it checks only what follows '.experts') and packs nothing, as for the fused mixtral adapter measured on 0.32."""
    adapter = _adapter(tmp_path, "mixtral", "per_expert", block="mlp")
    verdict = _check(adapter, "vllm", "vllm_per_expert_other_block", SILENTLY_IGNORED)
    assert "stays zero" in verdict.reason and "block_sparse_moe" in verdict.reason
    converted = _run_fix(verdict, capsys)  # via fused, back to 4.57's names
    again = check_adapter(converted, "vllm")
    assert (again.rule, again.outcome) == ("vllm_per_expert", LOADS)


def test_vllm_per_expert_with_names_vllm_does_not_map_is_refused(tmp_path):
    verdict = _check(_adapter(tmp_path, "qwen3_moe", "per_expert", projs=_MIXTRAL_V4), "vllm",
                     "vllm_per_expert_unknown_proj", REFUSED)
    assert verdict.message == "expected target modules in" and verdict.conversion is None


def test_vllm_per_expert_on_a_3d_arch_loads_with_the_mixed_format(tmp_path, capsys):
    arch = ["Qwen3_5MoeForConditionalGeneration"]
    adapter = _adapter(tmp_path, "qwen3_5_moe", "per_expert", architectures=arch)
    verdict = _check(adapter, "vllm", "vllm_per_expert_on_3d", LOADS_WITH_OPTION)
    assert verdict.options == VLLM_MIXED_FORMAT_2D == {"LLM": {"enable_mixed_moe_lora_format": True}}
    assert verdict.needed == "standard" and "--to fused --layout standard" in verdict.conversion
    assert verdict.architecture == arch[0]
    again = check_adapter(_run_fix(verdict, capsys), "vllm")
    assert (again.rule, again.outcome) == ("vllm_fused_3d", LOADS)


@pytest.mark.parametrize("model_type,architectures", [
    ("gpt_oss", None), ("gpt_oss", ["GptOssForCausalLM"]), ("qwen3_5_moe", ["Qwen3_5MoeForConditionalGeneration"]),
    ("qwen3_5_moe", None),  # no architectures: the model_type's HF default class (the multimodal one) decides
])
def test_vllm_fused_on_a_3d_arch_loads(tmp_path, model_type, architectures):
    verdict = _check(_adapter(tmp_path, model_type, "standard", architectures=architectures), "vllm", "vllm_fused_3d",
                     LOADS)
    assert (verdict.needed, verdict.options, verdict.conversion) == ("standard", None, None)


@pytest.mark.parametrize("model_type,architectures", [
    ("qwen3_moe", None), ("deepseek_v3", None), ("glm4_moe", None),
    ("qwen3_5_moe", ["Qwen3_5MoeForCausalLM"]),  # the text-only class is not 3D in vLLM
])
def test_vllm_fused_on_a_2d_arch_loads_with_options(tmp_path, capsys, model_type, architectures):
    """As measured on vLLM CPU 0.32.0 for qwen3_moe: refused by default, exact with the mixed MoE LoRA format."""
    adapter = _adapter(tmp_path, model_type, "standard", architectures=architectures)
    verdict = _check(adapter, "vllm", "vllm_fused_2d", LOADS_WITH_OPTION)
    assert verdict.options == VLLM_MIXED_FORMAT == {"LLM": {"enable_mixed_moe_lora_format": True},
                                                    "LoRARequest": {"is_3d_lora_weight": True}}
    assert verdict.message == "contains fused 3D MoE weights" and "--to per_expert" in verdict.conversion
    again = check_adapter(_run_fix(verdict, capsys), "vllm")
    assert (again.rule, again.outcome) == ("vllm_per_expert", LOADS)


def test_vllm_fused_mixtral_is_silently_ignored(tmp_path, capsys):
    """transformers 5.x names mixtral's experts mlp.experts, vLLM block_sparse_moe.experts: measured on vLLM CPU
    0.32.0, the adapter loads with every expert LoRA buffer zero and no warning."""
    verdict = _check(_adapter(tmp_path, "mixtral", "standard"), "vllm", "vllm_fused_other_block", SILENTLY_IGNORED)
    assert "stays zero" in verdict.reason and "without an error or warning" in verdict.reason
    assert verdict.options is None and "--to per_expert" in verdict.conversion
    again = check_adapter(_run_fix(verdict, capsys), "vllm")
    assert (again.rule, again.outcome) == ("vllm_per_expert", LOADS)


@pytest.mark.parametrize("model_type,fix", [("qwen3_moe", "--to per_expert"), ("gpt_oss", "--to standard")])
def test_vllm_fused_swapped_is_refused(tmp_path, capsys, model_type, fix):
    verdict = _check(_adapter(tmp_path, model_type, "swapped"), "vllm", "vllm_fused_swapped", REFUSED)
    assert "shape mismatch" in verdict.reason and fix in verdict.conversion and verdict.options is None
    again = check_adapter(_run_fix(verdict, capsys), "vllm")
    assert again.outcome == LOADS


@pytest.mark.parametrize("model_type,param,fix", [("qwen3_moe", "gate_up_proj", True), ("qwen3_moe", "down_proj", True),
                                                  ("gpt_oss", "down_proj", False)])
def test_vllm_fused_on_one_expert_parameter_is_refused(tmp_path, model_type, param, fix):
    verdict = _check(_adapter(tmp_path, model_type, "standard", params=(param,)), "vllm", "vllm_fused_incomplete",
                     REFUSED)
    assert f"only ['{param}']" in verdict.reason
    assert ("--to per_expert" in verdict.conversion) if fix else verdict.conversion is None


def test_vllm_mixed_adapter_is_refused(tmp_path):
    verdict = _check(_adapter(tmp_path, "qwen3_moe", "mixed"), "vllm", "vllm_mixed", REFUSED)
    assert verdict.found == "mixed" and verdict.conversion is None


# -- SGLang 0.5.23 -------------------------------------------------------------------------------------------------
def test_sglang_no_expert_lora(tmp_path):
    _check(_adapter(tmp_path, "qwen3_moe", "none"), "sglang", "sglang_no_expert_lora", LOADS)


def test_sglang_q_proj_without_v_proj_is_refused(tmp_path):
    verdict = _check(_adapter(tmp_path, "qwen3_moe", "none", attention=("q_proj",)), "sglang", "sglang_q_without_v",
                     REFUSED)
    assert verdict.message.endswith("self_attn.v_proj.lora_A.weight")


def test_sglang_regex_or_missing_target_modules_is_refused(tmp_path):
    adapter = _adapter(tmp_path, "qwen3_moe", "per_expert", target_modules=r".*\.(q_proj|v_proj|experts\.\d+\..*)")
    verdict = _check(adapter, "sglang", "sglang_target_modules_string", REFUSED)
    assert verdict.message == "SGLang does not recognize target_modules"
    adapter = _adapter(tmp_path, "qwen3_moe", "standard")  # an experts-only LoRA may have target_modules null
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    verdict = _check(adapter, "sglang", "sglang_target_modules_string", REFUSED)
    assert verdict.message == "only supports inferring LoRA target modules"


@pytest.mark.parametrize("target_modules", [None, "all-linear",
                                            ["q_proj", "v_proj", "mlp.experts.0.gate_proj", "up_proj", "down_proj"]])
def test_sglang_per_expert_loads(tmp_path, target_modules):
    adapter = _adapter(tmp_path, "qwen3_moe", "per_expert", target_modules=target_modules)
    verdict = _check(adapter, "sglang", "sglang_per_expert", LOADS)
    assert verdict.needed == "per_expert" and verdict.conversion is None


def test_sglang_mixtral_v4_target_names_are_refused(tmp_path):
    """transformers 4.57's mixtral per-expert adapter (what --to per_expert writes for mixtral): SGLang renames the
    w1/w3/w2 tensor keys itself, but keeps w1/w2/w3 as target_modules, for which it has no LoRA buffer."""
    adapter = _adapter(tmp_path, "mixtral", "per_expert", block="block_sparse_moe", projs=_MIXTRAL_V4)
    verdict = _check(adapter, "sglang", "sglang_per_expert_w_names", REFUSED)
    assert verdict.message == "get_hidden_dim not implemented for w1" and verdict.conversion is None
    assert "gate_proj/up_proj/down_proj" in verdict.reason


def test_sglang_per_expert_on_only_some_projections_is_silently_ignored(tmp_path):
    adapter = _adapter(tmp_path, "qwen3_moe", "per_expert", projs=("gate_proj", "up_proj"))
    verdict = _check(adapter, "sglang", "sglang_per_expert_partial", SILENTLY_IGNORED)
    assert "['down_proj']" in verdict.reason and "--lora-target-modules all" in verdict.reason


def test_sglang_fused_is_refused(tmp_path, capsys):
    verdict = _check(_adapter(tmp_path, "qwen3_moe", "standard"), "sglang", "sglang_fused", REFUSED)
    assert verdict.message == "Cannot find target module name for" and "--to per_expert" in verdict.conversion
    again = check_adapter(_run_fix(verdict, capsys), "sglang")
    assert (again.rule, again.outcome) == ("sglang_per_expert", LOADS)


def test_sglang_fused_mixtral_names_both_steps(tmp_path):
    """--to per_expert writes 4.57's w1/w3/w2 target names for mixtral, which SGLang refuses: no single command."""
    verdict = _check(_adapter(tmp_path, "mixtral", "swapped"), "sglang", "sglang_fused", REFUSED)
    assert verdict.conversion is None and "--to per_expert" in verdict.reason and "w1/w3/w2" in verdict.reason


@pytest.mark.parametrize("form", ["standard", "swapped"])
def test_sglang_gpt_oss_is_unsupported(tmp_path, form):
    verdict = _check(_adapter(tmp_path, "gpt_oss", form), "sglang", "sglang_gpt_oss", UNSUPPORTED)
    assert verdict.needed is None and verdict.conversion is None and "no per-expert modules" in verdict.reason


def test_sglang_mixed_adapter_is_refused(tmp_path):
    _check(_adapter(tmp_path, "qwen3_moe", "mixed"), "sglang", "sglang_mixed", REFUSED)


# -- transformers + peft -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("versions,model_type,form,needed,rule,outcome", [
    (("5.24.0", "0.21.2"), "qwen3_moe", "standard", "standard", "transformers_match", LOADS),
    (("5.24.0", "0.21.2"), "gpt_oss", "standard", "standard", "transformers_match", LOADS),
    (("5.24.0", "0.21.2"), "qwen3_moe", "swapped", "standard", "transformers_layout_mismatch", REFUSED),
    (("5.24.0", "0.21.2"), "gpt_oss", "swapped", "standard", "transformers_layout_mismatch", REFUSED),
    (("5.24.0", "0.21.2"), "qwen3_moe", "per_expert", "standard", "transformers_per_expert_on_fused_model",
     SILENTLY_IGNORED),
    (("5.5.0", "0.18.1"), "qwen3_moe", "swapped", "swapped", "transformers_match", LOADS),  # 0.18 on 5.x: swapped
    (("5.5.0", "0.18.1"), "qwen3_moe", "standard", "swapped", "transformers_layout_mismatch", REFUSED),
    (("5.5.0", "0.18.1"), "gpt_oss", "standard", "standard", "transformers_match", LOADS),  # (E, in, out): standard
    (("4.57.6", "0.18.1"), "qwen3_moe", "per_expert", "per_expert", "transformers_match", LOADS),
    (("4.57.6", "0.18.1"), "qwen3_moe", "standard", "per_expert", "transformers_fused_on_per_expert_model",
     SILENTLY_IGNORED),
    (("4.57.6", "0.21.2"), "gpt_oss", "standard", "swapped", "transformers_layout_mismatch", REFUSED),  # 4.57's gpt_oss
    (("4.57.6", "0.18.1"), "gpt_oss", "standard", "standard", "transformers_match", LOADS),  # declares no transposition
])
def test_transformers_verdict_follows_the_versions(tmp_path, versions, model_type, form, needed, rule, outcome):
    verdict = _check(_adapter(tmp_path, model_type, form), "transformers", rule, outcome,
                     transformers_version=versions[0], peft_version=versions[1])
    assert verdict.needed == needed and verdict.source.startswith("transformers + peft")
    if form != needed:
        assert f"--to {'fused --layout ' + needed if form == 'per_expert' else needed}" in verdict.conversion


def test_transformers_layout_mismatch_with_coinciding_shapes_is_silently_wrong(tmp_path):
    """2I == H: gate_up's standard and swapped factors have the same shapes; only the recorded peft_version tells."""
    adapter = _adapter(tmp_path, "qwen3_moe", "swapped", params=("gate_up_proj",), hidden=2 * I, peft_version="0.18.1")
    verdict = _check(adapter, "transformers", "transformers_layout_mismatch_same_shapes", SILENTLY_WRONG, **_TF5)
    assert verdict.found == "swapped" and "--to standard" in verdict.conversion


def test_transformers_mixed_adapter(tmp_path):
    _check(_adapter(tmp_path, "qwen3_moe", "mixed"), "transformers", "transformers_mixed", SILENTLY_IGNORED, **_TF5)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "transformers"])
def test_attention_only_adapter_is_compatible_everywhere(tmp_path, engine):
    versions = _TF5 if engine == "transformers" else {}
    verdict = check_adapter(_adapter(tmp_path, "qwen3_moe", "none"), engine, **versions)
    assert verdict.compatible and verdict.found == "none" and verdict.outcome == LOADS


# -- CLI -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine,model_type,form", [("vllm", "gpt_oss", "swapped"), ("sglang", "qwen3_moe", "swapped"),
                                                    ("transformers", "qwen3_moe", "per_expert")])
def test_suggested_conversion_makes_the_check_pass(tmp_path, capsys, engine, model_type, form):
    """The printed fix, run as printed (through the CLI), yields an adapter the same check accepts."""
    adapter = _adapter(tmp_path, model_type, form)
    versions = ["--transformers-version", "5.24.0", "--peft-version", "0.21.2"] if engine == "transformers" else []
    assert main(["check-adapter", str(adapter), "--engine", engine, *versions]) == 1
    out = capsys.readouterr().out
    assert "NOT compatible" in out
    assert ("read from source" in out) == (engine != "transformers")
    fix = next(line for line in out.splitlines() if line.startswith("fix: ")).removeprefix("fix: ")
    argv = shlex.split(fix)
    assert argv[:3] == ["python", "-m", "shims"]
    assert main(argv[3:]) == 0
    capsys.readouterr()
    assert main(["check-adapter", argv[5], "--engine", engine, *versions, "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["compatible"] is True and verdict["outcome"] == LOADS


def test_cli_prints_the_engine_options(tmp_path, capsys):
    adapter = _adapter(tmp_path, "qwen3_moe", "standard")
    assert main(["check-adapter", str(adapter), "--engine", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "NOT compatible (loads_with_option)" in out
    assert "loads with engine options: LLM(enable_mixed_moe_lora_format=True), LoRARequest(is_3d_lora_weight=True)" \
        in out
    assert "fix: python -m shims convert-adapter" in out and "rule vllm_fused_2d" in out
    assert main(["check-adapter", str(adapter), "--engine", "vllm", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert (verdict["outcome"], verdict["options"], verdict["rule"]) == (LOADS_WITH_OPTION, VLLM_MIXED_FORMAT,
                                                                        "vllm_fused_2d")
    assert verdict["engine_version"] == VLLM_VERSION and verdict["cites"] == list(RULES["vllm_fused_2d"].cites)
    assert verdict["message"] == "contains fused 3D MoE weights"


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["check-adapter", str(tmp_path / "missing"), "--engine", "vllm"]) == 2
    assert "not a saved peft adapter" in capsys.readouterr().err
    adapter = _adapter(tmp_path, "qwen3_moe", "standard")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody/not-cached-anywhere"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["check-adapter", str(adapter), "--engine", "sglang"]) == 2
    assert "'nobody/not-cached-anywhere'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["check-adapter", str(adapter), "--engine", "tgi"])
    assert exc.value.code == 2


def test_target_parameters_without_fused_tensors_is_bad_input(tmp_path, capsys):
    adapter = _adapter(tmp_path, "qwen3_moe", "none")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["check-adapter", str(adapter), "--engine", "vllm"]) == 2
    assert "no fused expert LoRA tensors" in capsys.readouterr().err


# -- against vLLM's own loader (only where vLLM is installed; the test lanes do not have it) -----------------------
def test_vllm_loader_names_behind_the_rules(tmp_path):
    """vLLM's adapter loader, run on the same synthetic adapters: the module names it gives them are the ones the
    rules compare with vLLM's models (mixtral: every expert LoRA lands under mlp.experts, while vLLM's mixtral holds
    block_sparse_moe.experts, hence silently ignored), and per-expert names are unexpected where the packed mapping
    of a 3D MoE model has no per-expert entries."""
    pytest.importorskip("vllm")
    import vllm.lora.lora_model as lora_model
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.mixtral import MixtralForCausalLM

    lora_model.PIN_MEMORY = False  # CPU machine
    mapper = MixtralForCausalLM.hf_to_vllm_mapper.get_rename_mapper()
    # expected_lora_modules as vllm/lora/worker_manager.py builds them: packed qkv_proj expanded, "experts" kept, and
    # on a 2D MoE model the per-expert names of its expert mapping (mixtral: w1/w2/w3)
    common = {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "experts"}
    expected_2d = common | {f"experts.{e}.{p}" for e in range(E) for p in ("w1", "w2", "w3")}

    def names(adapter, expected, weights_mapper=None):
        helper = PEFTHelper.from_local_dir(str(adapter), 4096)
        loaded = lora_model.LoRAModel.from_local_checkpoint(str(adapter), expected, peft_helper=helper,
                                                            lora_model_id=1, device="cpu",
                                                            weights_mapper=weights_mapper)
        return {name.split(".layers.0.", 1)[1].split(".experts")[0] for name in loaded.loras if ".experts" in name}

    assert names(_adapter(tmp_path, "mixtral", "standard"), expected_2d, mapper) == {"mlp"}
    assert names(_adapter(tmp_path, "mixtral", "per_expert", block="block_sparse_moe", projs=_MIXTRAL_V4),
                 expected_2d, mapper) == {"block_sparse_moe"}
    assert names(_adapter(tmp_path, "mixtral", "per_expert", block="mlp", name="mixtral_pe_mlp"), expected_2d,
                 mapper) == {"mlp"}
    with pytest.raises(ValueError, match="expected target modules in"):
        names(_adapter(tmp_path, "gpt_oss", "per_expert", name="gpt_oss_pe"), common)


def test_every_rule_has_a_test():
    """Runs last in this file (pytest keeps file order): every rule of RULES was asserted by a test above."""
    if len(_TESTED_RULES) < 5:
        pytest.skip("run the whole file to check the rule coverage")
    assert set(RULES) == _TESTED_RULES, sorted(set(RULES) - _TESTED_RULES)
