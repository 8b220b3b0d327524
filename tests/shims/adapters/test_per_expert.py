"""convert_adapter(to="per_expert"): a 5.x fused expert LoRA becomes transformers 4.57's per-expert LoRA modules with
every expert delta unchanged; proved against peft's own delta here and against a real transformers 4.57 + peft load
(a second venv, run as a subprocess) there. Also: the base config found in the local Hugging Face cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import lx_build_tiny_moe, lx_fused_experts

pytestmark = pytest.mark.needs_ml

_REPO = Path(__file__).resolve().parents[3]
# the transformers 4.57 test lane's venv; override with MOE_SHIMS_V457_PYTHON
_V457_PYTHON = Path(os.environ.get("MOE_SHIMS_V457_PYTHON",
                                   _REPO / ".nox/tests-tf4-57-6-peft0-18-1-trl0-25-1/bin/python"))
_PER_EXPERT_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe")
_EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _requires_fused():
    if not lx_fused_experts():
        pytest.skip("transformers 4.x: experts are per-expert modules already (no fused expert LoRA to split)")


def _attention(model_type):
    return ["q_b_proj", "o_proj"] if model_type == "deepseek_v3" else ["q_proj", "v_proj"]


def _ids():
    import torch

    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _fused_adapter(model_type, tmp_path, seed=1, **lora_kw):
    """Save a tiny fp32 base (loadable by 4.57) and a random fused expert adapter; return (base dir, adapter dir,
    PeftModel)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = lx_build_tiny_moe(model_type, dtype=torch.float32)
    base = tmp_path / f"{model_type}_base"
    model.save_pretrained(base)
    _add_v4_config_keys(base)
    torch.manual_seed(seed)
    kw = dict(r=4, lora_alpha=8, target_modules=_attention(model_type), target_parameters=_EXPERT_TARGETS,
              init_lora_weights=False)
    kw.update(lora_kw)
    peft_model = get_peft_model(model, LoraConfig(**kw))
    adapter = tmp_path / f"{model_type}_fused"
    peft_model.save_pretrained(adapter)
    return base, adapter, peft_model


def _add_v4_config_keys(base: Path):
    """5.x saves qwen3_moe's expert count only as num_local_experts; 4.57 reads num_experts (default 128)."""
    config = json.loads((base / "config.json").read_text())
    count = config.get("num_experts") or config.get("num_local_experts")
    if count and config["model_type"] == "qwen3_moe":
        config["num_experts"] = config["num_local_experts"] = count
        (base / "config.json").write_text(json.dumps(config))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


# ---- exact: per-expert factors recompose peft's own fused delta ------------------------------------------------------
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_per_expert_deltas_equal_peft_fused_delta(model_type, tmp_path):
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    import shims

    _requires_fused()
    base, adapter, peft_model = _fused_adapter(model_type, tmp_path)
    dst = tmp_path / "per_expert"
    record = shims.convert_adapter(adapter, dst, to="per_expert", base_config=base)
    assert record["expert_layout"] == "per_expert" and record["num_experts"] == 4
    config = json.loads((dst / "adapter_config.json").read_text())
    assert "target_parameters" not in config and config["peft_version"] == json.loads(
        (adapter / "adapter_config.json").read_text())["peft_version"]
    got = _tensors(dst)
    moe, gate, up, down = ("block_sparse_moe", "w1", "w3", "w2") if model_type == "mixtral" else \
        ("mlp", "gate_proj", "up_proj", "down_proj")
    inter = peft_model.config.intermediate_size if model_type == "mixtral" else peft_model.config.moe_intermediate_size
    scaling = 8 / 4
    checked = 0
    for name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ParamWrapper):
            continue
        delta = wrapper.get_delta_weight("default")  # (E, 2I, H) or (E, H, I): peft's own convention
        layer = name.split(".mlp.")[0]  # base_model.model.model.layers.N
        for e in range(delta.shape[0]):
            prefix = f"{layer}.{moe}.experts.{e}"

            def per_expert(proj):
                return got[f"{prefix}.{proj}.lora_B.weight"] @ got[f"{prefix}.{proj}.lora_A.weight"] * scaling

            if wrapper.parameter_name == "gate_up_proj":
                expected = torch.cat([per_expert(gate), per_expert(up)])
                assert expected.shape == (2 * inter, peft_model.config.hidden_size)
            else:
                expected = per_expert(down)
            torch.testing.assert_close(expected, delta[e], rtol=0, atol=1e-6)
            checked += 1
    assert checked == 2 * 2 * 4  # layers x params x experts
    attention = {k: v for k, v in _tensors(adapter).items() if ".experts." not in k}
    assert attention and all(torch.equal(got[k], v) for k, v in attention.items())  # copied as is


def test_swapped_and_standard_sources_give_the_same_per_expert_adapter(tmp_path):
    """The installed peft's layout and the other one (made with the exact swap) split to the same tensors: peft
    0.19+ writes standard here, 0.18 swapped (both lanes run this)."""
    import torch

    import shims

    _requires_fused()
    base, adapter, _ = _fused_adapter("qwen3_moe", tmp_path)
    a = shims.convert_adapter(adapter, tmp_path / "a", to="per_expert", base_config=base)
    (own,) = a["source_layouts"]
    other = "swapped" if own == "standard" else "standard"
    shims.convert_adapter(adapter, tmp_path / "other", to=other, base_config=base)
    b = shims.convert_adapter(tmp_path / "other", tmp_path / "b", to="per_expert", base_config=base)
    assert b["source_layouts"] == [other]
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_rank_and_alpha_patterns_follow_the_experts(tmp_path):
    import torch

    import shims

    _requires_fused()
    base, adapter, _ = _fused_adapter("qwen3_moe", tmp_path, rank_pattern={r".*\.down_proj": 2},
                                      alpha_pattern={r".*\.gate_up_proj": 3})
    dst = tmp_path / "pe"
    shims.convert_adapter(adapter, dst, to="per_expert", base_config=base)
    config = json.loads((dst / "adapter_config.json").read_text())
    # down_proj's rank 2 carries over through the fused pattern; gate/up get their own alpha entries
    assert config["alpha_pattern"][r"mlp\.experts\.\d+\.gate_proj"] == 3
    assert config["alpha_pattern"][r"mlp\.experts\.\d+\.up_proj"] == 3
    got = _tensors(dst)
    assert got["base_model.model.model.layers.0.mlp.experts.3.down_proj.lora_A.weight"].shape == torch.Size([2, 24])


def test_gpt_oss_has_no_per_expert_modules(tmp_path):
    import shims
    from shims.adapters.adapter_per_expert import PerExpertNotApplicable

    _requires_fused()
    base, adapter, _ = _fused_adapter("gpt_oss", tmp_path)
    with pytest.raises(PerExpertNotApplicable, match=r"fused on transformers 4.57 too.*\[\.\.\., ::2\] gate"):
        shims.convert_adapter(adapter, tmp_path / "pe", to="per_expert", base_config=base)
    assert not (tmp_path / "pe").exists()


# ---- transformers 4.57 + its peft load the converted adapter and reproduce the 5.x logits ---------------------------
_V457_SCRIPT = r"""
import json, sys, torch
import transformers, peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
cases = json.load(open(sys.argv[1]))
out = {}
for case in cases:
    base = AutoModelForCausalLM.from_pretrained(case["base"], torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, case["adapter"]).eval()
    expert_loras = sum(1 for n, _ in model.named_modules() if ".experts." in n and n.endswith("lora_A"))
    with torch.no_grad():
        logits = model(torch.tensor(case["ids"])).logits
    torch.save(logits, case["logits"])
    out[case["model_type"]] = {"expert_loras": expert_loras, "transformers": transformers.__version__,
                               "peft": peft.__version__}
print(json.dumps(out))
"""


def test_per_expert_adapter_reproduces_fused_logits_on_transformers_4_57(tmp_path):
    import torch

    import shims

    _requires_fused()
    if not _V457_PYTHON.is_file():
        pytest.skip(f"no transformers 4.57 interpreter at {_V457_PYTHON} (set MOE_SHIMS_V457_PYTHON)")
    ready = subprocess.run([str(_V457_PYTHON), "-c", "import torch, transformers, peft"], capture_output=True, text=True)
    if ready.returncode != 0:  # the lane's venv exists but is still being installed (test lanes run in parallel)
        pytest.skip(f"the transformers 4.57 interpreter {_V457_PYTHON} cannot import torch/transformers/peft yet: "
                    f"{ready.stderr.strip().splitlines()[-1] if ready.stderr.strip() else ready.returncode}")
    ids = _ids()
    cases, expected = [], {}
    for model_type in _PER_EXPERT_ARCHS:
        base, adapter, peft_model = _fused_adapter(model_type, tmp_path)
        with torch.no_grad():
            expected[model_type] = peft_model(ids).logits
            with peft_model.disable_adapter():
                base_logits = peft_model(ids).logits
        assert (expected[model_type] - base_logits).abs().max() > 0.1  # the adapter matters
        dst = tmp_path / f"{model_type}_per_expert"
        shims.convert_adapter(adapter, dst, to="per_expert", base_config=base)
        cases.append({"model_type": model_type, "base": str(base), "adapter": str(dst), "ids": ids.tolist(),
                      "logits": str(tmp_path / f"{model_type}.pt")})
    manifest, script = tmp_path / "cases.json", tmp_path / "v457.py"
    manifest.write_text(json.dumps(cases))
    script.write_text(_V457_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([str(_V457_PYTHON), str(script), str(manifest)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for model_type in _PER_EXPERT_ARCHS:
        assert report[model_type]["expert_loras"] == 2 * 4 * 3  # layers x experts x (gate, up, down)
        got = torch.load(tmp_path / f"{model_type}.pt")
        diff = (got - expected[model_type]).abs().max().item()
        assert diff <= 1e-5, f"{model_type}: max |d logits| = {diff} ({report[model_type]})"


# ---- base config from the local Hugging Face cache (no network) -----------------------------------------------------
def _fake_hub_cache(cache: Path, repo_id: str, config: dict) -> None:
    """Lay out ``repo_id``'s config.json as huggingface_hub's cache does: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


def _point_adapter_at(adapter: Path, repo_id: str) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = repo_id
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_base_config_is_found_in_the_hub_cache_by_the_cli(tmp_path):
    _requires_fused()
    base, adapter, _ = _fused_adapter("mixtral", tmp_path)
    repo_id = "tiny-org/tiny-mixtral"
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, repo_id, json.loads((base / "config.json").read_text()))
    _point_adapter_at(adapter, repo_id)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(_REPO))
    cli = [sys.executable, "-m", "shims", "convert-adapter", str(adapter)]
    proc = subprocess.run(cli + [str(tmp_path / "pe"), "--to", "per_expert"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_type"] == "mixtral"
    assert (tmp_path / "pe/adapter_model.safetensors").is_file()

    _point_adapter_at(adapter, "tiny-org/not-downloaded")
    proc = subprocess.run(cli + [str(tmp_path / "pe2"), "--to", "per_expert"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2
    assert "'tiny-org/not-downloaded'" in proc.stderr and "local Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "pe2").exists()
