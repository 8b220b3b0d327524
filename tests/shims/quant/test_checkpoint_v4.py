"""4-bit MoE checkpoints written by transformers 4.57 (per-expert Linear4bit keys) loaded on 5.x with the shims.

The checkpoints and their references (4.57's own dequantized expert weights and fp32 logits) are produced by the
4.57 test venv in a subprocess; these tests skip when that venv is absent. See shims/quant/checkpoint_v4.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from conftest import _LX_COMMON, _LX_EXTRA  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
V457_PYTHON = REPO / ".nox" / "tests-tf4-57-6-peft0-18-1-trl0-25-1" / "bin" / "python"
V5 = int(transformers.__version__.split(".")[0]) >= 5
PER_EXPERT_ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe")
FOUR_BIT_ROUTERS = {"qwen3_moe", "mixtral"}  # 4.57 quantizes their nn.Linear router; deepseek/glm keep a float one
CASES = [f"{arch}-{qt}-{'dq' if dq else 'nodq'}" for arch in PER_EXPERT_ARCHS for qt in ("nf4", "fp4")
         for dq in (True, False)]
LOGITS_MAX = 1e-5

# Run by the 4.57 venv: for each spec, save a tiny fp32 model, load it 4-bit, save that (4.57's own format), and
# record 4.57's dequantized expert weights (fused the way 5.x fuses them) and its fp32 logits.
_PRODUCER = r'''
import json, sys
import torch
import bitsandbytes.functional as F
import bitsandbytes.nn.modules as bnb_modules
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

if hasattr(bnb_modules, "has_avx512bf16"):  # the AVX512-BF16 eval kernel computes in bf16 and repacks weight.data
    bnb_modules.has_avx512bf16 = lambda: False
ROLES = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def expected_experts(model):
    out = {}
    for path, module in model.named_modules():
        if not path.endswith(".experts"):
            continue
        layer = path.split(".layers.")[1].split(".")[0]
        if isinstance(module, torch.nn.ModuleList):
            parts = {}
            for expert in module:
                for child, role in ROLES.items():
                    linear = getattr(expert, child, None)
                    if linear is not None:
                        w = linear.weight
                        parts.setdefault(role, []).append(F.dequantize_4bit(w.data, w.quant_state))
            out[f"{layer}.gate_up_proj"] = torch.stack([torch.cat(gu) for gu in zip(parts["gate"], parts["up"])])
            out[f"{layer}.down_proj"] = torch.stack(parts["down"])
        else:
            from shims.quant import storage
            for name in storage.quantized_tensor_names(module):
                out[f"{layer}.{name}"] = storage.dequantize_param(module, name)
    return out


for spec in json.load(open(sys.argv[1])):
    if spec.get("apply_shims"):
        import shims
        shims.apply()
    out = spec["out"]
    cfg = AutoConfig.for_model(spec["model_type"], **spec["config"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).save_pretrained(out + "/float")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec["quant_type"],
                             bnb_4bit_use_double_quant=spec["double_quant"], bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out + "/float", quantization_config=bnb, torch_dtype=torch.float32)
    model.save_pretrained(out + "/q4")
    expected = expected_experts(model)
    expected["ids"] = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected["logits"] = model(expected["ids"]).logits.float()
    save_file({k: v.contiguous() for k, v in expected.items()}, out + "/expected.safetensors")
'''

# Run by the 4.57 venv with the shims applied: load a checkpoint, print the exception type and message.
_LOADER_457 = r'''
import sys
import shims
shims.apply()
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as exc:  # report whatever 4.57 raises: the test judges it
    print("RAISED", type(exc).__name__, exc)
else:
    print("LOADED")
'''


def _spec(name, out, apply_shims=False):
    arch, quant_type, dq = name.split("-")
    return dict(model_type=arch, quant_type=quant_type, double_quant=dq == "dq", out=str(out),
                config=dict(_LX_COMMON, **_LX_EXTRA[arch]), apply_shims=apply_shims)


def _run_457(script: str, *args, cwd: Path) -> str:
    if not V457_PYTHON.exists():
        pytest.skip(f"no transformers 4.57 venv at {V457_PYTHON.relative_to(REPO)}")
    path = cwd / "script.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([str(V457_PYTHON), str(path), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def v457_checkpoints(tmp_path_factory):
    """case name -> folder with float/, q4/ (saved 4-bit by 4.57) and expected.safetensors; one 4.57 process."""
    if not V5:
        pytest.skip("loading 4.x per-expert checkpoints into fused experts is a transformers 5.x concern")
    root = tmp_path_factory.mktemp("v457")
    specs = [_spec(name, root / name) for name in CASES]
    specs.append(_spec("gpt_oss-nf4-dq", root / "gpt_oss-nf4-dq", apply_shims=True))  # shims on 4.57: fused 4-bit
    (root / "specs.json").write_text(json.dumps(specs))
    _run_457(_PRODUCER, root / "specs.json", cwd=root)
    return {spec["out"].rsplit("/", 1)[1]: Path(spec["out"]) for spec in specs}


@pytest.fixture
def applied(bnb_computes_in_its_compute_dtype):
    import shims

    shims.apply()
    yield shims
    shims.restore()


def _load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder / "q4", dtype=torch.float32).eval()


def _expected(folder):
    from safetensors.torch import load_file

    return load_file(folder / "expected.safetensors")


def _experts(model, layer):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("case", CASES)
def test_v457_checkpoint_loads_fused_bit_exact(v457_checkpoints, applied, case):
    import bitsandbytes as bnb

    from shims.quant import storage
    from shims.quant.checkpoint_v4 import describe_prequantized

    folder = v457_checkpoints[case]
    arch, quant_type, dq = case.split("-")
    info = describe_prequantized(folder / "q4")
    assert (info["format"], info["quant_type"], info["double_quant"]) == ("4.x per-expert", quant_type, dq == "dq")
    assert info["routers_4bit"] == (arch in FOUR_BIT_ROUTERS)

    model = _load(folder)
    expected = _expected(folder)
    for key, want in expected.items():
        if key in ("ids", "logits"):
            continue
        layer, name = key.split(".")
        experts = _experts(model, int(layer))
        param = storage.quantized_parametrization(experts, name)
        assert param is not None and param.quant_state.quant_type == quant_type, key
        assert not param.quant_state.nested  # double-quant absmax is stored un-nested (exact), see checkpoint_v4
        assert torch.equal(getattr(experts, name), want), f"{case} {key}: not 4.57's dequantized weights"
    attention = model.model.layers[0].self_attn
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in attention.modules())  # 4.57's Linear4bit keys, natively
    router = model.model.layers[0].mlp.gate
    assert (storage.quantized_parametrization(router, "weight") is not None) == (arch in FOUR_BIT_ROUTERS)
    with torch.no_grad():
        logits = model(expected["ids"]).logits
    d = (logits - expected["logits"]).abs().max().item()
    print(f"{case}: max|d logits| vs 4.57 = {d:.2e}")
    assert d <= LOGITS_MAX


def test_v457_shims_gpt_oss_fused_checkpoint_loads(v457_checkpoints, applied):
    """gpt_oss is fused on 4.57 too: with the shims there it is saved in the 5.x shims format and loads here."""
    from shims.quant.checkpoint_v4 import describe_prequantized

    folder = v457_checkpoints["gpt_oss-nf4-dq"]
    assert describe_prequantized(folder / "q4")["format"] == "5.x shims fused"
    model = _load(folder)
    expected = _expected(folder)
    assert torch.equal(_experts(model, 0).gate_up_proj, expected["0.gate_up_proj"])
    with torch.no_grad():
        assert (model(expected["ids"]).logits - expected["logits"]).abs().max().item() <= LOGITS_MAX


def _kl(p_logits, q_logits) -> float:
    p, q = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return torch.sum(p.exp() * (p - q), -1).mean().item()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_v457_checkpoint_expert_lora_trains_and_exports(v457_checkpoints, applied, arch, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = v457_checkpoints[f"{arch}-nf4-dq"]
    ids = _expected(folder)["ids"]
    torch.manual_seed(0)
    model = get_peft_model(_load(folder), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    expert_lora = {n: p for n, p in model.named_parameters() if "lora_" in n and ".experts" in n}
    assert expert_lora, "no LoRA on the fused 4-bit experts"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses, grads = [], set()
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads |= {n for n, p in expert_lora.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads), sorted(grads)

    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    applied.save_merged(model, tmp_path / "export", dtype=torch.float32, tokenizer=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        kl = _kl(want, reloaded(ids).logits)
    print(f"{arch}: float32 export KL vs PeftModel = {kl:.2e}")
    assert abs(kl) <= 1e-6


def test_v5_shims_checkpoint_on_457_raises_clear_error(tmp_path, applied, q4_checkpoint):
    """transformers 4.57 builds qwen3_moe's experts per expert: a fused 4-bit checkpoint cannot load there. Upstream
    fails with KeyError '...mlp.experts.weight'; with the shims applied on 4.57 the error names the layout."""
    from conftest import q4_load

    if not V5:
        pytest.skip("writes a transformers 5.x checkpoint")
    from shims.quant.checkpoint_v4 import describe_prequantized

    q4_load(q4_checkpoint("qwen3_moe")).save_pretrained(tmp_path / "q4")
    assert describe_prequantized(tmp_path / "q4")["format"] == "5.x shims fused"
    out = _run_457(_LOADER_457, tmp_path / "q4", cwd=tmp_path)
    assert out.startswith("RAISED ExpertQuantError"), out
    assert "fused 4-bit experts" in out and "transformers >= 5" in out, out


# ---- the fusion on its own (no subprocess) ---------------------------------------------------------------------


def _per_expert(tensors, **kw):
    import bitsandbytes.functional as F

    return [F.quantize_4bit(t.contiguous(), **kw) for t in tensors]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fuse_equals_quantizing_the_fused_tensor(quant_type):
    """Fusing per-expert 4-bit tensors gives the bytes and absmax bitsandbytes computes for the fused float tensor."""
    import bitsandbytes.functional as F

    from shims.quant.checkpoint_v4 import fuse_per_expert_quant_states

    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 5, 24, 64, generator=g)  # 5 experts of (I=24, H=64)
    packed, state = fuse_per_expert_quant_states(
        [_per_expert(gate, quant_type=quant_type), _per_expert(up, quant_type=quant_type)])
    want_packed, want_state = F.quantize_4bit(torch.cat([gate, up], dim=1).contiguous(), quant_type=quant_type)
    assert tuple(state.shape) == (5, 48, 64)
    assert torch.equal(packed, want_packed) and torch.equal(state.absmax, want_state.absmax)


def test_fuse_double_quant_is_exact_unnested():
    import bitsandbytes.functional as F

    from shims.quant.checkpoint_v4 import fuse_per_expert_quant_states

    down = torch.randn(3, 64, 24, generator=torch.Generator().manual_seed(1))
    parts = _per_expert(down, compress_statistics=True)
    packed, state = fuse_per_expert_quant_states([parts])
    assert not state.nested and state.absmax.dtype == torch.float32
    want = torch.stack([F.dequantize_4bit(p, s) for p, s in parts])
    assert torch.equal(F.dequantize_4bit(packed, state), want)


def test_fuse_refuses_blocks_across_experts():
    from shims.quant.checkpoint_v4 import PerExpertCheckpointError, fuse_per_expert_quant_states

    small = torch.randn(2, 3, 10)  # 30 elements per expert: a 64-block would straddle experts
    with pytest.raises(PerExpertCheckpointError, match="straddle"):
        fuse_per_expert_quant_states([_per_expert(small)])
