"""Every MoE architecture of a transformers release: discovered by cases/discover.py inside the cell's venv, run
through the case stages with the shims off and on, and written up as reports/ARCHS.md (one row per arch).

The hand-tuned archs of harness/matrix.toml stay the release matrix; the discovered ones are an additional,
generated set with a shorter run (``[archs]`` in matrix.toml), on one cell: the newest release lane by default.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import pandas as pd

from .. import runner, verdict
from ..matrix import Arch, Cell, Matrix, MatrixError
from ..results import case_id, load_dir, results_name, write_text_atomic

REPO = Path(__file__).resolve().parents[2]
NO_CAUSAL_LM = "no causal-LM head"  # the reason cases/discover.py gives for sub-models (vision, audio, encoders)


def discover(python: str, out: Path, timeout_s: float) -> dict:
    """Run the discovery in the cell's interpreter; its document (``archs``: entries, some with ``skip``)."""
    cmd = [python, "-m", "cases.discover", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=runner.child_env(), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"discovery failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


# Where the archs run is scheduled (checked against the workflow file by tests/harness/campaigns/test_archs.py).
SCHEDULE = ("CI (`bash .ci/run`: the test lanes) does not run it; the weekly e2e workflow does "
            "(`.github/workflows/e2e.yml`, job `archs`: `nox -s archs`)")
WORKAROUND_KEYS = ("bnb", "config", "why")


def workarounds(matrix: Matrix) -> dict[str, dict]:
    """``[archs.workarounds]``: arch -> {bnb: extra BitsAndBytesConfig arguments, config: tiny-config values,
    why: the upstream cause}; every entry must say why."""
    table = matrix.archs_settings.get("workarounds", {})
    for name, spec in table.items():
        unknown = set(spec) - set(WORKAROUND_KEYS)
        if unknown or not spec.get("why") or not (spec.get("bnb") or spec.get("config")):
            raise MatrixError(f"[archs.workarounds.{name}] needs why = \"...\" and bnb or config (and nothing else: "
                              f"{sorted(unknown)})")
    return table


def workaround_label(spec: dict) -> str:
    """One line naming what a workaround changes, e.g. ``llm_int8_skip_modules=['classifier']``."""
    parts = [f"{k}={v!r}" for k, v in {**spec.get("bnb", {}), **spec.get("config", {})}.items()]
    return ", ".join(parts)


def discovered_matrix(matrix: Matrix, doc: dict) -> Matrix:
    """The matrix with the discovered archs that built (their configs are complete: no common part), each with its
    workaround from ``[archs.workarounds]``, and the shorter run settings of ``[archs]``."""
    fixes = workarounds(matrix)
    archs = {}
    for e in doc["archs"]:
        if "skip" in e:
            continue
        fix = fixes.get(e["name"], {})
        archs[e["name"]] = Arch(e["name"], e["model_type"], tuple(e.get("attention", ())),
                                {**e["config"], **fix.get("config", {})}, dict(fix.get("bnb", {})))
    run = {**matrix.run, **matrix.archs_settings.get("run", {})}
    return dataclasses.replace(matrix, archs=archs, arch_common={}, run=run)


def report_paths(cell: Cell, matrix: Matrix) -> tuple[Path, Path]:
    """(results folder, markdown file) of an archs run on ``cell``: reports/archs and reports/ARCHS.md for the
    [archs] cell, reports/archs-<cell> and reports/ARCHS-<cell>.md for any other (a lane's run beside the newest)."""
    if cell.name == matrix.archs_cell().name:
        return REPO / "reports" / "archs", REPO / "reports" / "ARCHS.md"
    return REPO / "reports" / f"archs-{cell.name}", REPO / "reports" / f"ARCHS-{cell.name}.md"


def run(cell: Cell, python: str, matrix: Matrix, out_dir: Path, work: Path, only=None,
        report: Path | None = None) -> Path:
    """Discover, run both shims modes on the archs that built, render ARCHS.md (or ``report``); returns its path."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = discover(python, out_dir / "discovered.json", float(matrix.run["install_timeout_s"]))
    sub = discovered_matrix(matrix, doc)
    names = [n for n in sub.archs if not only or n in only]
    quants = matrix.archs_settings.get("quants", ["nf4"])
    if names:
        runner.run_modes(cell, ("off", "on"), python, sub, out_dir / "results", work, names, quants)
    return write_report(doc, out_dir / "results", report or REPO / "reports" / "ARCHS.md", quants,
                        workarounds(matrix), RunInfo(time.monotonic() - started, len(names), list(only or ())))


def _cases(results: Path) -> dict[tuple[str, str], dict]:
    """(arch/quant, mode) -> the case record, from the results files of the run."""
    out = {}
    docs, _problems = load_dir(results)
    for doc in docs:
        for case in doc.get("cases", []):
            out[(case_id(case["arch"], case["quant"]), doc["mode"])] = case
    return out


def _lane(results: Path) -> str:
    """The versions the run's results record (transformers / peft / trl / torch), one line."""
    docs, _problems = load_dir(results)
    seen = sorted({", ".join(f"{p} {(d.get('versions') or {}).get(p) or '?'}"
                             for p in ("transformers", "peft", "trl", "torch")) for d in docs})
    return "; ".join(seen) or "no results"


def fast_path_cell(case: dict | None) -> str:
    """Rule fast_path_equals_peft of a shims case: fast-path modules / expert LoRA chains, max |d logits| against its
    bound (or why the stage did not compare)."""
    if case is None:
        return ""
    m, stage = case.get("metrics", {}), case.get("stages", {}).get("fast_path", {})
    if "fast_vs_peft_max_abs" not in m:
        return f"{stage.get('status')}: {stage.get('reason', '')}"[:60] if stage else ""
    bound = verdict.fast_path_bound(m)
    shown = "n/a" if bound is None else f"{bound:.1e}"
    return (f"{m.get('fast_path_experts')}/{m.get('fast_path_modules')} fast, "
            f"{m['fast_vs_peft_max_abs']:.1e} <= {shown}")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the header says about the run that produced the results: wall time, archs run, an --only subset."""

    seconds: float
    archs_run: int
    only: list[str] = dataclasses.field(default_factory=list)


def rows(doc: dict, results: Path, quants: list[str], fixes: dict | None = None) -> pd.DataFrame:
    cases = _cases(results) if results.exists() else {}
    judged = {key: verdict.judge(case) for key, case in cases.items()}
    fixes = fixes or {}
    table = []
    for entry in doc["archs"]:
        if "skip" in entry and entry["skip"].startswith(NO_CAUSAL_LM):
            continue  # listed after the table
        tiny = "tiny config: override" if entry.get("override") else ""
        if "skip" in entry:
            table.append({"arch": entry["name"], "native": "not run", "shims": "not run", "fast = peft": "",
                          "workaround": tiny, "why": " ".join(entry["skip"].split())})  # one table line: validator messages span several
            continue
        workaround = "; ".join(x for x in (workaround_label(fixes.get(entry["name"], {})), tiny) if x)
        for quant in quants:
            key = case_id(entry["name"], quant)
            native, shims = judged.get((key, "off")), judged.get((key, "on"))
            table.append({
                "arch": key, "native": native[0] if native else "missing", "shims": shims[0] if shims else "missing",
                "fast = peft": fast_path_cell(cases.get((key, "on"))), "workaround": workaround,
                "why": "" if shims and shims[0] == verdict.PASS else "; ".join((shims or ("", ["no result"]))[1])[:400],
            })
    return pd.DataFrame(table)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _notes(doc: dict, fixes: dict) -> list[str]:
    """Why each workaround and each tiny-config override is there (the rows name which one they ran with)."""
    built = {e["name"] for e in doc["archs"] if "skip" not in e}
    lines = []
    for name in sorted(fixes):
        ran = "ran with" if name in built else "not run here; users' workaround"
        lines.append(f"- **{name}** ({ran} `{workaround_label(fixes[name])}`): {fixes[name]['why']}")
    for entry in doc["archs"]:
        if entry.get("override"):
            lines.append(f"- **{entry['name']}**: tiny config from the override table of cases/discover.py: "
                         f"{entry['override']}")
    return ["Workarounds and tiny-config overrides ([archs.workarounds] in harness/matrix.toml, OVERRIDES in "
            "cases/discover.py):", "", *lines, ""] if lines else []


def write_report(doc: dict, results: Path, out: Path, quants: list[str], fixes: dict | None = None,
                 info: RunInfo | None = None) -> Path:
    fixes = fixes or {}
    df = rows(doc, results, quants, fixes)
    ran = df[df["native"] != "not run"]
    heads = sorted(e["name"] for e in doc["archs"] if e.get("skip", "").startswith(NO_CAUSAL_LM))
    counts = {
        "model types with an experts class": len(doc["archs"]),
        "causal LM": len(doc["archs"]) - len(heads),
        "tiny model built": len(ran),
        "shims pass": int((ran["shims"] == verdict.PASS).sum()),
        "native pass": int((ran["native"] == verdict.PASS).sum()),
    }
    when = f"Generated by `nox -s archs` on {dt.date.today().isoformat()} from a run"
    if info is not None:
        when += f" of {_minutes(info.seconds)} ({info.archs_run} archs x shims off/on, discovery included)"
        if info.only:
            when += f", limited to {', '.join(info.only)} (--only): the other rows have no result"
    lines = [
        f"# Every MoE architecture of transformers {doc.get('transformers', '?')}",
        "",
        f"Lane: {_lane(results) if results.exists() else 'no results'}.",
        "",
        f"{when}. {SCHEDULE}. Discovery: `cases/discover.py` (model types whose modeling module defines an experts "
        "class; tiny configs derived from each config class's defaults). Stages as in the release matrix, "
        f"quantization {', '.join(quants)}, shorter training ([archs] in harness/matrix.toml). The workaround column "
        "names what a row ran with besides the recipe (explained below the table); the why column gives the first "
        "reasons of every shims cell that is not pass. The fast = peft column is rule fast_path_equals_peft of the "
        "shims cell: experts modules on the fast expert-LoRA path / expert LoRA chains (the others run peft's path: an "
        "experts class the fast path does not emulate, e.g. ergo's own forward, or one without transformers' experts "
        "flags; with none fast the bound is 0), then max |logits(fast path) - logits(peft's path)| <= its derived "
        "float32 bound (harness/verdict.py).",
        "",
        " | ".join(f"{k}: {v}" for k, v in counts.items()),
        "",
        df.to_markdown(index=False),
        "",
        *_notes(doc, fixes),
        f"Not run, no causal-LM head (vision / audio / encoder parts, composite wrappers, encoder-decoder models; "
        f"{len(heads)}): " + ", ".join(heads),
        "",
    ]
    write_text_atomic(out, "\n".join(lines))
    return out
