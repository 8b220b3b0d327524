"""The serving stages: what was trained is what a real engine (vLLM) serves.

``serve_merged`` (after ``export``, shims on): the merged exports (``shims.save_merged``, float32 and bf16) served by
vLLM in a process of its own (cases/serve_engine.py), compared with exact references:

- float32: the served export against the trained model computing in float32 (its float32 twin for the bf16-compute
  recipe; see cases/measure.float32_twin), whole-vocabulary prompt log-probabilities and greedy tokens. The bound is
  the harness's float32 export bound (verdict.KL_EXPORT_FP32_MAX), not a margin over measured engine noise; the
  engine's own noise is measured in the same run and reported: vLLM against transformers on one folder (the control).
- both dtypes: the engine must serve the shims' folder exactly as it serves transformers' own ``save_pretrained`` of
  the same weights (float32: the export reloaded and re-saved; bf16: the float32 export rounded to bf16 as
  transformers rounds it). Same engine, same values, so the log-probabilities must be bit-identical: anything the
  folder says beyond its tensors (config, names, dtype, tokenizer) that the engine reads differently shows here.
  bf16 serving differs from bf16 transformers by whole units of log-probability on these tiny random models, so a bf16
  comparison is only meaningful against a bf16 reference served the same way.

``serve_adapters`` (after ``save_adapter``): for each adapter layout (fused as saved; per-expert as converted by
``shims.convert_adapter``) what vLLM's LoRA loader does with it, by comparing the expert LoRA it loaded with peft's
own per-expert deltas, with default engine options and with ``enable_mixed_moe_lora_format``; and whether
``shims.check_adapter(engine="vllm")`` predicted exactly that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import measure, tiny

ENGINE_SCRIPT = "cases.serve_engine"
# what cases/serve_engine.py may return for one adapter, and how the stage names what it saw
LOADS, WITH_OPTION, REFUSED, IGNORED, WRONG = "loads", "loads_with_option", "refused", "silently_ignored", "wrong"
INTERLEAVED_GATE_UP = frozenset({"gpt_oss"})  # fused gate_up with gate / up interleaved (transformers and vLLM)
MIXED_FORMAT_OPTIONS = {"LLM": {"enable_mixed_moe_lora_format": True}, "LoRARequest": {"is_3d_lora_weight": True}}


class EngineError(RuntimeError):
    """The serving engine's process failed or a job in it did."""


def texts(run: dict) -> list[str]:
    """The prompts served: two training sentences (long contexts) and the generation prompts."""
    return tiny.training_texts()[:2] + tiny.prompts(run["prompts"])


# -- the engine process --------------------------------------------------------------------------------------------
def run_engine(jobs: list[dict], work: Path, settings: dict, timeout_s: float) -> dict:
    """Run cases/serve_engine.py on ``jobs`` in the serving interpreter (this one unless MOE_SHIMS_SERVE_PYTHON)."""
    work.mkdir(parents=True, exist_ok=True)
    request, out = work / "request.json", work / "result.json"
    request.write_text(json.dumps({"settings": settings, "jobs": jobs}), encoding="utf-8")
    out.unlink(missing_ok=True)
    python = os.environ.get("MOE_SHIMS_SERVE_PYTHON", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("MOE_SHIMS_MUTATION", "MOE_SHIMS_ONLY")}
    env["OMP_NUM_THREADS"] = os.environ.get("MOE_SHIMS_SERVE_THREADS", "2")
    cmd = [python, "-m", ENGINE_SCRIPT, "--request", str(request), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"the serving engine ran past {timeout_s:.0f} s") from exc
    (work / "engine.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not out.is_file():
        raise EngineError(f"the serving engine exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    result = json.loads(out.read_text(encoding="utf-8"))
    for name, job in result["jobs"].items():
        if "error" in job:
            raise EngineError(f"engine job {name}: {job['error']['type']}: {job['error']['message'][:1500]}")
    return result


# -- references computed with transformers -------------------------------------------------------------------------
@torch.no_grad()
def transformers_logprobs(model, token_ids: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, log p(. | tokens < i) for i = 1..n-1 (what the engine's prompt_logprobs hold), float64."""
    model.eval()
    device = measure.device_of(model)
    out = []
    for ids in token_ids:
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, :-1]
        out.append(F.log_softmax(logits.double().cpu(), dim=-1))
    return out


@torch.no_grad()
def transformers_greedy(model, token_ids: list[list[int]], new_tokens: int, pad_token_id: int) -> list[list[int]]:
    """Greedy continuations one prompt at a time (no padding), as the engine generates them."""
    model.eval()
    device = measure.device_of(model)
    out = []
    for ids in token_ids:
        gen = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_token_id, eos_token_id=None)
        out.append(gen[0, len(ids):].tolist())
    return out


def engine_logprobs(job: dict) -> list[torch.Tensor]:
    return [torch.tensor(p["prompt_logprobs"], dtype=torch.float64) for p in job["prompts"]]


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over positions of KL(reference || other), from log-probabilities."""
    per_position = torch.cat([(r.exp() * (r - o)).sum(-1) for r, o in zip(reference, other)])
    return float(per_position.mean())


# -- serve_merged ----------------------------------------------------------------------------------------------------
def resaved(export_fp32: Path, dest: Path, dtype, tokenizer) -> Path:
    """transformers' own ``save_pretrained`` of the float32 export's weights in ``dtype`` (bf16: rounded as the bf16
    export must be, tensors that export keeps in float32 left float32): the control folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_fp32, dtype=torch.float32)
    if dtype != torch.float32:
        measure.round_as_export(model, dtype, store=True)
        model.config.dtype = dtype
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def serve_merged(case) -> None:
    """Stage body (``case``: cases.pipeline.Case after its export stage)."""
    from transformers import AutoModelForCausalLM

    run, work = case.spec.run, case.work
    prompts = texts(run)
    token_ids = [case.tokenizer(t)["input_ids"] for t in prompts]
    folders = {"export_fp32": work / "export-fp32", "export_bf16": work / "export"}
    folders["resave_fp32"] = resaved(folders["export_fp32"], work / "serve-resave-fp32", torch.float32, case.tokenizer)
    folders["resave_bf16"] = resaved(folders["export_fp32"], work / "serve-resave-bf16", torch.bfloat16,
                                     case.tokenizer)
    jobs = [{"kind": "generate", "name": name, "model": str(path), "dtype": "bfloat16" if "bf16" in name else "float32",
             "prompts": prompts, "new_tokens": run["new_tokens"]} for name, path in folders.items()]
    result = run_engine(jobs, work / "serve-merged", run["serve"]["settings"], run["serve"]["timeout_s"])
    served = result["jobs"]
    case.metrics["serve_engine"] = f"vllm {result['vllm']}"
    for name, job in served.items():
        got = [p["prompt_token_ids"] for p in job["prompts"]]
        if got != token_ids:
            raise AssertionError(f"{name}: the engine tokenized the prompts as {got}, transformers as {token_ids}")
    lp = {name: engine_logprobs(job) for name, job in served.items()}
    tokens = {name: [p["tokens"] for p in job["prompts"]] for name, job in served.items()}

    reference_model = case.float32_model()
    reference = "float32 twin of the trained model" if case.spec.recipe else "trained model"
    pad = case.tokenizer.pad_token_id
    reference_lp = transformers_logprobs(reference_model, token_ids)
    reference_tokens = transformers_greedy(reference_model, token_ids, run["new_tokens"], pad)
    del reference_model
    control = AutoModelForCausalLM.from_pretrained(folders["resave_fp32"], dtype=torch.float32)
    control_lp = transformers_logprobs(control, token_ids)
    del control
    bf16 = AutoModelForCausalLM.from_pretrained(folders["export_bf16"], dtype=torch.bfloat16)
    bf16_lp = transformers_logprobs(bf16, token_ids)
    del bf16
    trained_lp = transformers_logprobs(case.model, token_ids)  # the live PeftModel as trained (bf16 compute: recipe)

    case.metrics.update(
        serve_reference=reference,
        kl_serve_fp32=mean_kl(reference_lp, lp["export_fp32"]),
        samples_serve_fp32=measure.agreement(reference_tokens, tokens["export_fp32"]),
        serve_fp32_vs_trained_max_abs=max_abs(reference_lp, lp["export_fp32"]),
        serve_control_max_abs=max_abs(control_lp, lp["resave_fp32"]),
        serve_fp32_vs_resave_max_abs=max_abs(lp["export_fp32"], lp["resave_fp32"]),
        samples_serve_fp32_vs_resave=measure.agreement(tokens["resave_fp32"], tokens["export_fp32"]),
        serve_bf16_vs_resave_max_abs=max_abs(lp["export_bf16"], lp["resave_bf16"]),
        samples_serve_bf16_vs_resave=measure.agreement(tokens["resave_bf16"], tokens["export_bf16"]),
        serve_bf16_vs_transformers_max_abs=max_abs(bf16_lp, lp["export_bf16"]),
        kl_serve_bf16_vs_trained=mean_kl(trained_lp, lp["export_bf16"]),
        serve_seconds={name: job["seconds"] for name, job in served.items()},
    )


# -- serve_adapters --------------------------------------------------------------------------------------------------
def peft_expert_deltas(model) -> dict[int, dict[str, torch.Tensor]]:
    """layer index -> {"w1" | "w3": (E, I, H), "w2": (E, H, I)} from peft's own ``get_delta_weight`` of a PeftModel
    computing in float32 (the trained model's, or its float32 twin's: the same factors) fused expert LoRA (gate = w1,
    up = w3, down = w2 in the engine's naming)."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ != "ParamWrapper" or not hasattr(module, "get_delta_weight"):
            continue
        layer = re.search(r"layers\.(\d+)\.", name)
        param = module.parameter_name
        if layer is None:
            continue
        with torch.no_grad():
            delta = module.get_delta_weight(module.active_adapters[0]).float().cpu()
        transposed = bool(getattr(module.get_base_layer(), "is_transposed", False))
        if transposed:  # (E, in, out) storage, e.g. gpt_oss: the engine's factors are (out, in) per expert
            delta = delta.transpose(1, 2)
        parts = out.setdefault(int(layer[1]), {})
        if param.startswith("gate_up"):
            parts.update(_split_gate_up(delta, interleaved=transposed))
        elif param.startswith("down"):
            parts["w2"] = delta
    return out


def _split_gate_up(delta: torch.Tensor, interleaved: bool) -> dict[str, torch.Tensor]:
    # 5.x gate_up_proj: gate rows then up rows; gpt_oss interleaves them (gate 0::2, up 1::2)
    if interleaved:
        return {"w1": delta[:, 0::2], "w3": delta[:, 1::2]}
    half = delta.shape[1] // 2
    return {"w1": delta[:, :half], "w3": delta[:, half:]}


def engine_expert_deltas(buffers: dict[str, torch.Tensor], adapter: str,
                         interleaved: bool = False) -> dict[int, dict[str, tuple]]:
    """layer -> {"w1" | "w3" | "w2": (delta (E, out, in), elementwise rounding bound)} from the engine's buffers.
    ``interleaved``: a packed gate_up factor (the engine's 3D experts LoRA) holds gate and up rows interleaved, as
    vLLM keeps them for gpt_oss (vllm/lora/layers/fused_moe.py ``_slice_w13_b``, lora/model_manager.py), rather than
    gate rows then up rows.

    The bound is the fp32 error of the product of stored factors that peft's delta is also computed from:
    |fl(B @ A) - s (B0 @ A0)| <= gamma_(r+2) * (|B| @ |A|) with gamma_n = n u / (1 - n u), u = 2^-24 (a rank-r dot
    product plus the scaling folded into B on one side and applied after the product on the other)."""
    layers: dict[int, dict[str, tuple]] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in buffers.items():
        owner, _, rest = key.partition("/")
        if owner != adapter:
            continue
        module, kind, index = rest.rsplit(".", 2)
        groups.setdefault(module, {})[f"{kind}.{index}"] = value
    u = 2.0 ** -24
    for module, parts in groups.items():
        layer = int(re.search(r"layers\.(\d+)\.", module)[1])
        out = layers.setdefault(layer, {})
        pairs = {"w2": ("w2_lora_b.0", "w2_lora_a.0")}
        if "w13_lora_a.1" in parts:  # gate and up held apart
            pairs.update(w1=("w13_lora_b.0", "w13_lora_a.0"), w3=("w13_lora_b.1", "w13_lora_a.1"))
        else:  # one packed gate_up factor pair (the engine's 3D experts LoRA)
            pairs["w13"] = ("w13_lora_b.0", "w13_lora_a.0")
        for role, (b_key, a_key) in pairs.items():
            b, a = parts[b_key].double(), parts[a_key].double()
            rank = a.shape[-2]
            gamma = (rank + 2) * u / (1 - (rank + 2) * u)
            delta, bound = b @ a, gamma * (b.abs() @ a.abs())
            if role == "w13":
                gate, up = _split_gate_up(delta, interleaved), _split_gate_up(bound, interleaved)
                out["w1"], out["w3"] = (gate["w1"], up["w1"]), (gate["w3"], up["w3"])
            else:
                out[role] = (delta, bound)
    return layers


def compare_adapter(reference: dict, loaded: dict) -> tuple[str, dict]:
    """(outcome, details): LOADS when every expert delta the engine holds equals peft's within the rounding bound,
    IGNORED when the engine holds no expert LoRA at all (every buffer zero), WRONG otherwise."""
    worst, checked, nonzero = 0.0, 0, 0
    for layer, parts in reference.items():
        for role, want in parts.items():
            if layer not in loaded or role not in loaded[layer]:
                return WRONG, {"missing": f"layer {layer} {role}: no engine buffer"}
            got, bound = loaded[layer][role]
            if got.shape != want.shape:
                return WRONG, {"shape": f"layer {layer} {role}: engine {tuple(got.shape)} vs peft {tuple(want.shape)}"}
            if not (torch.isfinite(got).all() and torch.isfinite(bound).all()):
                return WRONG, {"not_finite": f"layer {layer} {role}: the engine holds non-finite LoRA factors"}
            nonzero += int(bool(got.abs().max() > 0))
            excess = (got - want.double()).abs() - bound - 2.0 ** -24 * want.double().abs()
            worst = max(worst, float(excess.max()))
            checked += 1
    if nonzero == 0:
        return IGNORED, {"checked": checked}
    return (LOADS if worst <= 0 else WRONG), {"checked": checked, "worst_excess": worst}


def adapter_forms(case) -> dict[str, Path | str]:
    """layout name -> adapter folder (or why that layout does not exist for this arch)."""
    import shims

    fused = case.work / "adapter"
    per_expert = case.work / "adapter-per_expert"
    shutil.rmtree(per_expert, ignore_errors=True)
    try:
        shims.convert_adapter(fused, per_expert, to="per_expert", base_config=case.model_dir)
    except ValueError as exc:  # e.g. gpt_oss: no per-expert modules to convert to
        return {"fused": fused, "per_expert": f"not converted: {exc}"}
    return {"fused": fused, "per_expert": per_expert}


def _mixed_options(form: str) -> dict:
    """The engine options of the mixed-format load: the engine flag, and for a fused adapter the request's flag."""
    return MIXED_FORMAT_OPTIONS if form == "fused" else {"LLM": MIXED_FORMAT_OPTIONS["LLM"]}


def measured_outcome(default: str, mixed: str) -> str:
    """One outcome from the adapter's two loads (default engine options; mixed MoE LoRA format)."""
    if default != REFUSED:
        return default
    return WITH_OPTION if mixed == LOADS else mixed


def serve_adapters(case) -> None:
    """Stage body (``case``: cases.pipeline.Case after save_adapter; the trained PeftModel still live)."""
    import shims

    forms = adapter_forms(case)
    ready = {k: v for k, v in forms.items() if isinstance(v, Path)}
    rank = case.spec.lora_rank  # the engine must accept the trained rank (max_lora_rank)
    settings = case.spec.run["serve"]["settings"]
    jobs = []
    for option in ("default", "mixed"):
        adapters = [{"name": form, "path": str(path), "rank": rank,
                     "request_options": _mixed_options(form).get("LoRARequest", {}) if option == "mixed" else {}}
                    for form, path in ready.items()]
        jobs.append({"kind": "lora", "name": option, "model": str(case.model_dir), "dtype": "float32",
                     "llm_options": MIXED_FORMAT_OPTIONS["LLM"] if option == "mixed" else {}, "adapters": adapters,
                     "buffers": str(case.work / "serve-adapters" / f"buffers-{option}.safetensors")})
    result = run_engine(jobs, case.work / "serve-adapters", settings, case.spec.run["serve"]["timeout_s"])
    # peft's deltas computed in float32 (a bf16-compute model's ParamWrapper multiplies its factors in bf16)
    reference = peft_expert_deltas(case.float32_model())
    if not reference:
        raise AssertionError("the trained model has no fused expert LoRA to compare the engine's with")
    buffers = {}
    for option in ("default", "mixed"):
        path = case.work / "serve-adapters" / f"buffers-{option}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            buffers[option] = load_file(str(path))
    rows = {}
    for form in forms:
        if form not in ready:
            rows[form] = {"outcome": "n/a", "why": forms[form]}
            continue
        seen = {}
        for option in ("default", "mixed"):
            entry = result["jobs"][option]["adapters"][form]
            if entry["status"] == "refused":
                seen[option] = (REFUSED, {"error": entry["error"]["message"][:300]})
            else:
                seen[option] = compare_adapter(reference, engine_expert_deltas(
                    buffers[option], form, interleaved=case.spec.model_type in INTERLEAVED_GATE_UP))
        outcome = measured_outcome(seen["default"][0], seen["mixed"][0])
        check = shims.check_adapter(ready[form], engine="vllm", base_config=case.model_dir)
        used = _mixed_options(form) if outcome == WITH_OPTION else None  # the options it loaded with
        rows[form] = {"outcome": outcome, "predicted": check.outcome, "options": used, "check_options": check.options,
                      "default": seen["default"], "mixed": seen["mixed"], "check_reason": check.reason}
    case.metrics["serve_engine"] = f"vllm {result['vllm']}"
    case.metrics["serve_adapter_outcomes"] = {form: row["outcome"] for form, row in rows.items()}
    case.metrics["serve_adapter_predicted"] = {form: row.get("predicted") for form, row in rows.items() if
                                               "predicted" in row}
    # where it loads only with options: the options check-adapter names must be the ones it loaded with
    case.metrics["serve_adapter_options_predicted"] = {form: row["check_options"] == row["options"]
                                                       for form, row in rows.items() if row.get("options")}
    case.metrics["serve_adapter_details"] = rows
