"""Full-depth benchmark, side by side in one run: a Qwen3-30B-A3B-shaped model QLoRA-trained with the shims under
a GPU memory cap, the same levers at half depth next to bf16, a streamed merged export, and one DeepSeek-V3-sized
MoE layer. Each configuration runs in its own process (cases/bench_depth.py); a crash, an out-of-memory or a
timeout is a row with its error. Writes reports/BENCH-depth.md (+ JSON).

    python -m harness bench-depth --python PY [--device cuda] [--full]   (gpu/run.sh depth does this on a GPU)

Without ``--full`` the dims are small (CPU, minutes); ``--full`` uses the real shapes (a GPU with ~64 GB of disk).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shlex
import time
from pathlib import Path

from .bench import run_case_process
from ..results import write_json_atomic, write_text_atomic

GIB = 1024 ** 3

QWEN3_30B_A3B = ["--hidden", "2048", "--experts", "128", "--top-k", "8", "--moe-intermediate", "768",
                 "--vocab", "151936", "--heads", "32", "--kv-heads", "4", "--head-dim", "128", "--layers", "48"]
DEEPSEEK_V3_LAYER = ["--hidden", "7168", "--experts", "256", "--top-k", "8", "--moe-intermediate", "2048",
                     "--vocab", "1024", "--heads", "8"]
SMALL = ["--hidden", "64", "--experts", "8", "--top-k", "2", "--moe-intermediate", "48", "--vocab", "512",
         "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--layers", "4"]


def plan(full: bool) -> list[dict]:
    """The runs, in order: name, cases.bench_depth arguments (CKPT and EXPORT are filled in), what it shows."""
    dims = QWEN3_30B_A3B if full else SMALL
    deep, half = ("48", "24") if full else ("4", "2")
    seq = "2048" if full else "64"
    cap = ["--cap-gib", "24"] if full else []
    common = ["--seq", seq, "--batch", "1", "--rank", "16", "--steps", "3", *dims]
    return [
        {"name": "build", "args": ["build", "CKPT", "--format", "nf4", "--double-quant", *dims],
         "what": "write the 4-bit checkpoint directly (no bf16 copy on disk)"},
        {"name": f"shims-levers-{deep}", "args": ["run", "CKPT", "--config", "shims-levers", *cap, *common],
         "what": f"{deep} layers, shims 4-bit + levers, under the cap"},
        {"name": f"shims-levers-{half}", "args": ["run", "CKPT", "--config", "shims-levers", "--run-layers", half,
                                                  *cap, "--export", "EXPORT", "--profile", *common],
         "what": f"{half} layers, shims 4-bit + levers, then shims.save_merged of the whole model"},
        {"name": f"bf16-levers-{half}", "args": ["run", "CKPT", "--config", "bf16-levers", "--run-layers", half,
                                                 "--profile", *common],
         "what": f"{half} layers, bf16 weights + the same levers (no cap: bf16 does not fit one)"},
        {"name": f"shims-recipe-{deep}", "args": ["run", "CKPT", "--config", "shims-recipe", *cap, *common],
         "what": f"{deep} layers, the tutorial recipe without the levers, under the cap"},
        {"name": "huge-layer", "args": ["huge", "WORK", "--seq", "256" if full else "16",
                                        *(DEEPSEEK_V3_LAYER if full else SMALL[:10])],
         "what": "one DeepSeek-V3-sized MoE layer: 4-bit storage, forward, LoRA, export, exact"},
        *peer_plan(full),
    ]


PEER_LAYERS = {True: "8", False: "2"}


def peer_plan(full: bool) -> list[dict]:
    """Peers on one bf16 checkpoint in the hub's per-expert format (what they all read), quantized at load, at a
    depth whose bf16 checkpoint fits the disk next to the 4-bit one; same levers, same cap, same seq."""
    dims = [*(QWEN3_30B_A3B if full else SMALL)[:-2], "--layers", PEER_LAYERS[full]]
    cap = ["--cap-gib", "24"] if full else []
    common = ["--seq", "2048" if full else "64", "--batch", "1", "--rank", "16", "--steps", "3", *cap, *dims]
    n = PEER_LAYERS[full]
    return [
        {"name": "build-hub", "args": ["build", "HUB", "--format", "bf16-hub", *dims],
         "what": f"{n}-layer bf16 checkpoint, per-expert keys (hub format)"},
        {"name": f"peer-shims-{n}", "args": ["run", "HUB", "--config", "shims-levers", *common], "peer": True,
         "what": f"{n} layers: transformers 5.x + shims, quantized at load"},
        {"name": f"peer-tf457-{n}", "args": ["run", "HUB", "--config", "native-levers", *common], "peer": True,
         "interp": "tf457", "what": f"{n} layers: transformers 4.57 native 4-bit (per-expert Linear4bit)"},
        {"name": f"peer-e4b-{n}", "args": ["run", "HUB", "--config", "e4b-levers", *common], "peer": True,
         "interp": "peers", "what": f"{n} layers: experts4bit-qlora's loader (its expert LoRA; attention bf16, "
                                    "no attention LoRA)"},
        {"name": f"peer-unsloth-{n}", "args": ["run", "HUB", "--config", "unsloth-levers", *common], "peer": True,
         "interp": "peers", "what": f"{n} layers: unsloth FastLanguageModel, 4-bit, its LoRA and checkpointing"},
    ]


def _needed_build(step: dict) -> str | None:
    """The build a run reads its checkpoint from (None: it builds its own model)."""
    return "build-hub" if "HUB" in step["args"] else "build" if "CKPT" in step["args"] else None


def run_all(pythons: dict[str, list[str]], device: str, full: bool, work: Path, timeout_s: float,
            only=None, after_each=None) -> dict:
    """Every run of the plan (``only``: some of them, plus the builds they need); ``pythons`` maps interpreter
    labels (tf5, tf457, peers) to commands. ``after_each(doc)`` is called after every run (the report is
    rewritten then, so a run cut short still leaves what finished)."""
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    fill = {"CKPT": str(work / "ckpt"), "HUB": str(work / "hub"), "EXPORT": str(work / "export"),
            "WORK": str(work)}
    steps = plan(full)
    wanted = {s["name"] for s in steps if not only or s["name"] in only}
    wanted |= {_needed_build(s) for s in steps if s["name"] in wanted and not s["name"].startswith("build")} - {None}
    results = {}
    doc = {"when": time.time(), "host": platform.node(), "device": device, "full": full,
           "plan": [{k: s[k] for k in ("name", "what", "peer") if k in s} for s in steps if s["name"] in wanted],
           "results": results}
    for step in steps:
        if step["name"] not in wanted:
            continue
        build = _needed_build(step)
        if build and step["name"] != build and "error" in results.get(build, {}):
            results[step["name"]] = {"error": f"not run: {build} failed"}
            continue
        python = pythons.get(step.get("interp", "tf5"))
        if python is None:
            results[step["name"]] = {"error": f"not run: no {step.get('interp')} interpreter given"}
            continue
        args = [fill.get(a, a) for a in step["args"]] + ["--device", device]
        results[step["name"]] = run_case_process(python, "cases.bench_depth", args, timeout_s)
        shutil.rmtree(work / "export", ignore_errors=True)  # a 24-layer bf16 export is 31 GB of disk
        if after_each is not None:
            after_each(doc)
    return doc


# ---------------------------------------------------------------------------------------------------------- render
def _gib(value) -> str:
    return "" if not isinstance(value, (int, float)) else f"{value / GIB:.2f}"


def _peak(r: dict, phase: str, key: str):
    return (r.get(phase) or {}).get(key)


def _spread(values) -> str:
    if not values:
        return ""
    ordered = sorted(values)
    return f"{ordered[0]:.3f} / {ordered[len(ordered) // 2]:.3f} / {ordered[-1]:.3f}"


def _train_rows(doc: dict, peers: bool = False) -> list[dict]:
    gpu = doc["device"] == "cuda"
    rows = []
    for step in doc["plan"]:
        if bool(step.get("peer")) != peers:
            continue
        r = doc["results"].get(step["name"])
        if step["name"].startswith(("build", "huge-layer")) or r is None:
            continue
        rows.append({
            "run": step["name"], **({"device run": r["run"]} if "run" in r else {}), "what": step["what"],
            "layers": r.get("layers", ""),
            "cap GiB": r.get("cap_gib") or "",
            "resident GiB": _gib(r.get("resident_bytes")),
            "train peak GiB": _gib(_peak(r, "train_peak", "gpu" if gpu else "host")),
            **({"reserved peak GiB": _gib(_peak(r, "train_peak", "gpu_reserved"))} if gpu else {}),
            "step s min / median / max": _spread(r.get("step_s")),
            "tokens/s": f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "",
            "LoRA": ",".join(r.get("lora_dtypes", [])), "optimizer": r.get("optimizer", ""),
            "system": _system(r),
            "loss first -> last": (f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}" if r.get("losses") else ""),
            "error": _short(r["error"]) if r.get("error") else "",
        })
    return rows


def _system(r: dict) -> str:
    label = r.get("peer") or (f"transformers {r['transformers']}" if r.get("transformers") else "")
    fast = r.get("e4b_fast_modules")
    if fast is not None:
        label += f"; fused training kernels on {fast} modules" if isinstance(fast, int) else f"; {fast}"
    elif label.startswith("experts4bit"):  # runs before the bench enabled them
        label += "; its fused training kernels not enabled (grouped-nf4-gemm not installed in that run)"
    return label


def _short(error: str) -> str:
    """The exception part of a recorded error (older records kept the last lines of the traceback)."""
    parts = [p.strip() for p in error.split(" | ")]
    named = [p for p in parts if "Error" in p.split(":")[0]]
    return (named[-1] if named else parts[-1])[:300]


def _notes(doc: dict) -> list[str]:
    """Explanations computed from the measurements (the step-time gap, what fits a 24 GB card)."""
    res, out = doc["results"], []
    half, deep = ("24", "48") if doc["full"] else ("2", "4")
    shims, bf16 = res.get(f"shims-levers-{half}", {}), res.get(f"bf16-levers-{half}", {})
    if shims.get("step_median_s") and bf16.get("step_median_s") and shims.get("dequant_layer_s"):
        gap = shims["step_median_s"] - bf16["step_median_s"]
        dequant = 2 * int(shims["layers"]) * shims["dequant_layer_s"]
        out.append(f"- step time at {shims['layers']} layers: shims {1000 * shims['step_median_s']:.0f} ms, bf16 "
                   f"{1000 * bf16['step_median_s']:.0f} ms (medians; {1000 * gap:+.0f} ms). The 4-bit experts are "
                   "dequantized twice per layer and step (forward, and the checkpointing recompute, whose stacks the "
                   f"backward then uses): 2 x {shims['layers']} x {1000 * shims['dequant_layer_s']:.2f} ms = "
                   f"{1000 * dequant:.0f} ms; bf16 pays instead for peft's W + delta of every expert (see the "
                   "profiled step below). Step times vary by up to ~20 % between runs on the same GPU "
                   "(min / median / max above), so only ratios within one run are compared.")
    deep_run = res.get(f"shims-levers-{deep}", {})
    if doc["device"] == "cuda" and _peak(deep_run, "train_peak", "gpu_reserved"):
        out.append(f"- a 24 GB card: {deep} layers train with {_gib(_peak(deep_run, 'train_peak', 'gpu'))} GiB "
                   f"allocated at peak ({_gib(_peak(deep_run, 'train_peak', 'gpu_reserved'))} GiB reserved by "
                   "torch's allocator; the CUDA context adds ~0.5 GiB outside it), under a hard 24 GiB cap.")
    recipe = res.get(f"shims-recipe-{deep}", {})
    if "error" in recipe:
        out.append(f"- the tutorial recipe without the levers does not fit the cap at {deep} layers: "
                   f"{_short(recipe['error'])}")
    return out


def _targets(doc: dict) -> list[dict]:
    res, gpu = doc["results"], doc["device"] == "cuda"
    deep, half = ("48", "24") if doc["full"] else ("4", "2")
    mem_key = "gpu" if gpu else "host"
    out = []

    def add(what, value, bound, ok):
        out.append({"target": what, "measured": value, "bound": bound,
                    "met": {True: "yes", False: "**no**", None: "not measured"}[ok]})

    peak = _peak(res.get(f"shims-levers-{deep}", {}), "train_peak", mem_key)
    add(f"{deep} layers, shims + levers: train peak (allocated)", _gib(peak) + " GiB" if peak else "",
        "<= 20 GiB" if doc["full"] else "(small dims: reported)",
        None if peak is None else (peak <= 20 * GIB if doc["full"] else True))
    shims_step = res.get(f"shims-levers-{half}", {}).get("step_median_s")
    bf16_step = res.get(f"bf16-levers-{half}", {}).get("step_median_s")
    ratio = shims_step / bf16_step if shims_step and bf16_step else None
    add(f"{half} layers: shims step / bf16 step (median, same levers)", f"{ratio:.3f}" if ratio else "", "<= 1.1",
        None if ratio is None else ratio <= 1.1)
    export = res.get(f"shims-levers-{half}", {}).get("export")
    if export:
        allowance = export["shard_bytes"] + export["layer_bytes"]
        if gpu:
            extra = export["peak"]["gpu"] - export["before_bytes"]
            add("export: GPU peak above resident", f"{_gib(extra)} GiB", f"<= shard + layer = {_gib(allowance)} GiB",
                extra <= allowance)
        extra_host = export["peak"]["host"] - export["host_before_bytes"]
        add("export: host peak above the process before export", f"{_gib(extra_host)} GiB",
            f"<= shard + layer = {_gib(allowance)} GiB", extra_host <= allowance)
        add("export: every delta applied", f"{export['applied']}/{export['attempted']}", "all",
            export["applied"] == export["attempted"] > 0)
    else:
        add("export", "", "bounded peaks", None)
    huge = res.get("huge-layer", {})
    ok = (huge.get("storage_exact") and all(huge["storage_exact"].values()) and huge.get("forward_max_abs") == 0.0
          and huge.get("lora_b_moved") and huge.get("export_exact")) if "error" not in huge and huge else None
    add("DeepSeek-V3 layer: storage, forward, export exact; LoRA trains",
        json.dumps({k: huge.get(k) for k in ("storage_exact", "forward_max_abs", "export_mismatches")})
        if huge and "error" not in huge else huge.get("error", ""), "exact", ok)
    return out


def render(doc: dict) -> str:
    import pandas as pd

    res = doc["results"]
    device = next((r.get("device_name") for r in res.values() if r.get("device_name")), doc["device"])
    when = dt.datetime.fromtimestamp(doc["when"], dt.timezone.utc)
    build, huge = res.get("build", {}), res.get("huge-layer", {})
    versions = next((r.get("transformers") for r in res.values() if r.get("transformers")), "?")
    runs = doc.get("runs") or [{"when": doc["when"], "command": doc.get("command", "python -m harness bench-depth"),
                                "runs": [s["name"] for s in doc["plan"]]}]
    lines = [
        f"# Full-depth QLoRA benchmark ({device})", "",
        f"- when: {when:%Y-%m-%d %H:%M} UTC on {doc['host']}; transformers {versions}; "
        f"{'Qwen3-30B-A3B shapes' if doc['full'] else 'small dims (CPU smoke run)'}",
        *[f"- run {i} ({dt.datetime.fromtimestamp(r['when'], dt.timezone.utc):%H:%M} UTC: {', '.join(r['runs'])}): "
          f"`{r['command']}`" for i, r in enumerate(runs, 1)],
        "- each run is its own process, one after another, in this one run; step times are the timed steps after one "
        "warm-up step (min / median / max of 3); memory is torch's allocator (allocated; reserved also shown) on a "
        "GPU and the sampled resident set on CPU",
        f"- checkpoint: {_describe_build(build)}", "",
        "## Training", "", pd.DataFrame(_train_rows(doc)).to_markdown(index=False) if _train_rows(doc) else "no runs",
        "", "## Targets", "", pd.DataFrame(_targets(doc)).to_markdown(index=False), "",
        "## How the targets are met or missed, and what fits", "", *(_notes(doc) or ["(nothing to explain)"]), "",
        *_profile_section(doc),
        "## DeepSeek-V3-sized MoE layer", "", _huge_table(huge), "",
        *[f"- earlier attempt, {name}: {res[name].get('error', 'no error')}" for name in res
          if name.startswith("huge-layer (run")], "",
        "## Peers, side by side (same GPU, shapes, levers, cap and seq; shallower, so that the bf16 checkpoint they "
        "all read fits the disk)", "", f"- checkpoint: {_describe_build(res.get('build-hub', {}))}", "",
        pd.DataFrame(_train_rows(doc, peers=True)).to_markdown(index=False) if _train_rows(doc, True) else "no runs",
        "", *_peer_ratios(doc), "",
    ]
    return "\n".join(lines)


def _profile_section(doc: dict) -> list[str]:
    """The ops of one profiled train step per run that has one (the same step, side by side): self time per op."""
    import pandas as pd

    profiled = {name: r["profile"] for name, r in doc["results"].items() if isinstance(r.get("profile"), dict)}
    if not profiled:
        return []
    ops = {}
    for name, prof in profiled.items():
        for op in prof["ops"]:
            ops.setdefault(op["name"], {"op": op["name"]})[name] = f"{op['ms']:.1f} ({op['calls']})"
    first = next(iter(profiled))
    order = {op["name"]: -op["ms"] for op in profiled[first]["ops"]}
    rows = sorted(ops.values(), key=lambda r: order.get(r["op"], 0.0))
    clock = next(iter(profiled.values()))["clock"]
    return ["## Where a step's time goes (one more step of each run, under torch.profiler)", "",
            *[f"- {name}: step {1000 * p['wall_s']:.0f} ms wall (profiler on), {p['total_ms']:.0f} ms {clock} "
              "self time in all ops" for name, p in profiled.items()], "",
            f"Self {clock} time in ms (calls), the top ops of each run:", "",
            pd.DataFrame(rows).fillna("").to_markdown(index=False), ""]


def _huge_table(huge: dict) -> str:
    import pandas as pd

    if not huge:
        return "not run"
    rows = [{"check": k, "result": json.dumps(v) if isinstance(v, (dict, list)) else v} for k, v in huge.items()]
    return pd.DataFrame(rows).to_markdown(index=False)


def _describe_build(build: dict) -> str:
    if "error" in build:
        return f"build failed: {build['error']}"
    if not build:
        return "not built"
    how = ("written directly in 4 bits (nf4, double quant) layer by layer" if build.get("format") == "nf4"
           else f"{build.get('format')}")
    return (f"{build.get('layers')} layers, {build.get('params', 0) / 1e9:.2f} B parameters, {how}: "
            f"{_gib(build.get('stored_bytes'))} GiB on disk, {build.get('build_s')} s")


def _peer_ratios(doc: dict) -> list[str]:
    """Each peer's train peak, median step and resident memory relative to 5.x + shims of the same run."""
    res, key = doc["results"], "gpu" if doc["device"] == "cuda" else "host"
    peers = [s["name"] for s in doc["plan"] if s.get("peer")]
    ours = {res[n].get("run"): n for n in peers if n.startswith("peer-shims") and n in res}
    lines = []
    for name in peers:
        if name.startswith("peer-shims"):
            continue
        r = res.get(name, {})
        if not r:  # planned, not run (yet: the report is rewritten after every run)
            lines.append(f"- {name}: not run")
            continue
        ref_name = ours.get(r.get("run"))
        ref = res.get(ref_name, {})
        if not r or "error" in r or not ref or "error" in ref:
            lines.append(f"- {name}: no ratio ({(r.get('error') or ref.get('error') or 'no shims row in its run')[:300]})")
            continue
        lines.append(f"- {name} / {ref_name}: train peak {_peak(r, 'train_peak', key) / _peak(ref, 'train_peak', key):.2f}x, "
                     f"step {r['step_median_s'] / ref['step_median_s']:.2f}x, resident "
                     f"{r['resident_bytes'] / ref['resident_bytes']:.2f}x")
    return lines


def merge_docs(docs: list[dict]) -> dict:
    """One document from several runs on one machine (device calls are at most 10 minutes each): every run's
    results tagged with its run number. A name that a later run repeats is that later run's result; the earlier
    one stays in the report as ``name (run k)``. Ratios are only ever taken within one run (see _peer_ratios)."""
    merged = {**docs[0], "plan": [], "results": {}, "runs": []}
    for number, doc in enumerate(docs, 1):
        if (doc["device"], doc["full"]) != (docs[0]["device"], docs[0]["full"]):
            raise ValueError("bench-depth runs of different devices or dims cannot be merged")
        for step in doc["plan"]:
            name = step["name"]
            if name not in doc["results"]:
                continue
            if name in merged["results"]:  # the later run's result becomes the named one; the earlier stays shown
                earlier = f"{name} (run {merged['results'][name]['run']})"
                merged["results"][earlier] = merged["results"].pop(name)
                merged["plan"] = [{**s, "name": earlier} if s["name"] == name else s for s in merged["plan"]]
            merged["plan"].append(step)
            merged["results"][name] = {**doc["results"][name], "run": number}
        merged["runs"].append({"when": doc["when"], "command": doc.get("command", ""),
                               "runs": [s["name"] for s in doc["plan"] if s["name"] in doc["results"]]})
    return merged


def write(doc: dict, md: Path, js: Path) -> None:
    write_json_atomic(js, doc)
    write_text_atomic(md, render(doc))


def main_args(args) -> dict:
    pythons = {"tf5": shlex.split(args.python)}
    if args.python457:
        pythons["tf457"] = shlex.split(args.python457)
    if args.python_peers:
        pythons["peers"] = shlex.split(args.python_peers)
    def save(doc):
        doc["command"] = args.command_line
        write(doc, args.out, args.json)

    doc = run_all(pythons, args.device, args.full, args.work, args.timeout_s,
                  only=[o for o in args.only.split(",") if o] or None, after_each=save)
    save(doc)
    return doc
