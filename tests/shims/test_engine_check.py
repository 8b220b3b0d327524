"""check_adapter / `python -m shims check-adapter`: every engine x adapter expert form (per-expert, fused standard,
fused swapped, none) on a non-transposed arch (qwen3_moe) and on gpt_oss, with synthetic adapters of the exact key
names and shapes peft writes (no model is built), and the suggested conversion really making the check pass."""

from __future__ import annotations

import json
import shlex

import pytest

from shims.__main__ import main

E, R, H, I = 4, 2, 64, 24  # 2I != H, so the shapes tell the layouts apart
_PREFIX = "base_model.model.model.layers.0"


def _base(tmp_path, model_type):
    key = "num_local_experts" if model_type in ("gpt_oss", "mixtral") else "num_experts"
    config = {"model_type": model_type, "hidden_size": H, key: E,
              ("intermediate_size" if model_type in ("gpt_oss", "mixtral") else "moe_intermediate_size"): I}
    path = tmp_path / f"{model_type}_base"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _adapter(tmp_path, model_type, form):
    """A saved adapter with attention LoRA and, per ``form``, per-expert / fused standard / fused swapped LoRA."""
    import torch
    from safetensors.torch import save_file

    from shims.lora_layout import ExpertDims

    base = _base(tmp_path, model_type)
    tensors = {f"{_PREFIX}.self_attn.q_proj.lora_A.weight": torch.randn(R, H),
               f"{_PREFIX}.self_attn.q_proj.lora_B.weight": torch.randn(H, R)}
    config = {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(base)}
    if form == "per_expert":
        for e in range(E):
            for name, (out, inp) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                tensors[f"{_PREFIX}.mlp.experts.{e}.{name}.lora_A.weight"] = torch.randn(R, inp)
                tensors[f"{_PREFIX}.mlp.experts.{e}.{name}.lora_B.weight"] = torch.randn(out, R)
        config["target_modules"] += ["gate_proj", "up_proj", "down_proj"]
    elif form in ("standard", "swapped"):
        dims = ExpertDims(E, H, I, model_type == "gpt_oss")
        for prefix, param in ((f"{_PREFIX}.mlp.experts.base_layer", "gate_up_proj"),
                              (f"{_PREFIX}.mlp.experts", "down_proj")):
            d1, d2 = dims.param_shape(param)
            a_on_d2 = (form == "standard") != dims.is_transposed  # lora_layout.layout_from_flag, inverted
            a_in, b_out = (d2, d1) if a_on_d2 else (d1, d2)
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(E * R, a_in)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(b_out, E * R)
        config["target_parameters"] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    path = tmp_path / f"{model_type}_{form}"
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


# (engine, model_type, form) -> what the engine needs; forms that cannot exist (per-expert gpt_oss) are left out
_TF5 = dict(transformers_version="5.24.0", peft_version="0.21.2")
_CASES = [
    # vLLM: per-expert for qwen3_moe; fused standard for gpt_oss; swapped never
    ("vllm", "qwen3_moe", "per_expert", "per_expert"),
    ("vllm", "qwen3_moe", "standard", "per_expert"),
    ("vllm", "qwen3_moe", "swapped", "per_expert"),
    ("vllm", "gpt_oss", "standard", "standard"),
    ("vllm", "gpt_oss", "swapped", "standard"),
    # SGLang: per-expert only; nothing for gpt_oss
    ("sglang", "qwen3_moe", "per_expert", "per_expert"),
    ("sglang", "qwen3_moe", "standard", "per_expert"),
    ("sglang", "qwen3_moe", "swapped", "per_expert"),
    ("sglang", "gpt_oss", "standard", None),
    ("sglang", "gpt_oss", "swapped", None),
    # transformers 5.24 + peft 0.21.2: fused standard
    ("transformers", "qwen3_moe", "per_expert", "standard"),
    ("transformers", "qwen3_moe", "standard", "standard"),
    ("transformers", "qwen3_moe", "swapped", "standard"),
    ("transformers", "gpt_oss", "standard", "standard"),
    ("transformers", "gpt_oss", "swapped", "standard"),
]


@pytest.mark.parametrize("engine,model_type,form,needed", _CASES)
def test_engine_verdicts(tmp_path, engine, model_type, form, needed):
    import shims

    adapter = _adapter(tmp_path, model_type, form)
    kw = _TF5 if engine == "transformers" else {}
    verdict = shims.check_adapter(adapter, engine, **kw)
    assert (verdict.model_type, verdict.found, verdict.needed) == (model_type, form, needed)
    assert verdict.compatible == (form == needed)
    assert verdict.exit_code == (0 if form == needed else 1)
    if needed is None:
        assert verdict.conversion is None and "no per-expert modules" in verdict.reason
    elif form == needed:
        assert verdict.conversion is None
    else:
        assert f"--to {'fused --layout ' + needed if form == 'per_expert' else needed}" in verdict.conversion
    assert "read from source, the engine itself is not run here" in verdict.source
    if engine == "vllm" and form == "swapped":
        assert "shape error" in verdict.reason


@pytest.mark.parametrize("versions,model_type,form,needed", [
    (("5.5.0", "0.18.1"), "qwen3_moe", "swapped", "swapped"),    # peft 0.18 on 5.x writes swapped
    (("5.5.0", "0.18.1"), "qwen3_moe", "standard", "swapped"),
    (("5.5.0", "0.18.1"), "gpt_oss", "standard", "standard"),    # ... but standard for (E, in, out) experts
    (("4.57.6", "0.18.1"), "qwen3_moe", "per_expert", "per_expert"),
    (("4.57.6", "0.18.1"), "qwen3_moe", "standard", "per_expert"),
    (("4.57.6", "0.21.2"), "gpt_oss", "standard", "swapped"),    # 4.57's gpt_oss does not declare is_transposed
    (("4.57.6", "0.18.1"), "gpt_oss", "standard", "standard"),
])
def test_transformers_verdict_follows_the_versions(tmp_path, versions, model_type, form, needed):
    from shims.engine_check import check_adapter

    verdict = check_adapter(_adapter(tmp_path, model_type, form), "transformers", transformers_version=versions[0],
                            peft_version=versions[1])
    assert (verdict.needed, verdict.compatible) == (needed, form == needed)


@pytest.mark.parametrize("engine", ["vllm", "sglang", "transformers"])
def test_attention_only_adapter_is_compatible_everywhere(tmp_path, engine):
    from shims.engine_check import check_adapter

    versions = _TF5 if engine == "transformers" else {}
    verdict = check_adapter(_adapter(tmp_path, "qwen3_moe", "none"), engine, **versions)
    assert verdict.compatible and verdict.found == "none"


@pytest.mark.parametrize("engine,form", [("vllm", "standard"), ("sglang", "swapped"), ("transformers", "per_expert"),
                                         ("vllm", "per_expert")])
def test_suggested_conversion_makes_the_check_pass(tmp_path, capsys, engine, form):
    """The printed fix, run as printed (through the CLI), yields an adapter the same check accepts."""
    adapter = _adapter(tmp_path, "gpt_oss" if (engine, form) == ("vllm", "per_expert") else "qwen3_moe",
                       "standard" if (engine, form) == ("vllm", "per_expert") else form)
    versions = ["--transformers-version", "5.24.0", "--peft-version", "0.21.2"] if engine == "transformers" else []
    if (engine, form) == ("vllm", "per_expert"):  # gpt_oss standard is already right: exercise the exit-0 path
        assert main(["check-adapter", str(adapter), "--engine", engine]) == 0
        return
    assert main(["check-adapter", str(adapter), "--engine", engine, *versions]) == 1
    out = capsys.readouterr().out
    assert "NOT compatible" in out and "read from source" in out
    fix = next(line for line in out.splitlines() if line.startswith("fix: ")).removeprefix("fix: ")
    argv = shlex.split(fix)
    assert argv[:3] == ["python", "-m", "shims"]
    assert main(argv[3:]) == 0
    capsys.readouterr()
    converted = argv[5]
    assert main(["check-adapter", converted, "--engine", engine, *versions, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compatible"] is True


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
