"""The version sweep: a small case set over every release in a range, and what works where.

    nox -s sweep -- --transformers 5.0.0..latest --peft 0.19.1,latest [--arch qwen3_moe] [--quant nf4] [--minor]

Each (transformers x peft) pair is a cell with its own uv venv (uv's cache makes a release installed once cheap the
next time); a pair that does not resolve is a row saying so. The cells run one after another into
reports/sweep/results, sharing one artifact store, so the cross-version stages (adapters across versions, 4.x
checkpoints) see what the cells before them published; a 4.57 publisher cell ([sweep] publisher) runs first for
the 4.x checkpoints. reports/SWEEP.md then answers "does FEATURE work on RELEASE" natively and with the shims, and
says per shim over which releases it is needed, unnecessary (a retirement candidate) or broken.

Features are read from the verdict rules and stages (FEATURES below): a feature works in a run when every stage it
needs ran and every rule of it that applies held, in every case of the run.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..reporting import necessity
from .. import verdict
from ..matrix import LATEST, Cell, Matrix, MatrixError, check_version
from ..results import case_key

_RELEASE = re.compile(r"^\d+(\.\d+)*$")  # final releases only: no rc / dev / post


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def published_releases(package: str, timeout_s: float = 30) -> list[str]:
    """Every final release of ``package`` on PyPI, oldest first (its JSON API: standard library only)."""
    url = f"https://pypi.org/pypi/{package}/json"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = json.load(response)
    except OSError as exc:
        raise MatrixError(f"cannot list the releases of {package} ({url}: {exc})") from exc
    releases = [v for v, files in data.get("releases", {}).items() if _RELEASE.match(v) and files
                and not all(f.get("yanked") for f in files)]
    return sorted(releases, key=version_key)


def select(spec: str, available: list[str], package: str, minor_only: bool = False) -> list[str]:
    """``spec``: "A..B" (every release from A to B, B may be "latest"), a comma list, or both mixed ("0.19.1,
    0.21.0..latest"). ``minor_only``: of each major.minor in a range, only its newest patch release. Names that are
    not releases raise, naming what is available."""
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if ".." in part:
            low, high = (s.strip() for s in part.split("..", 1))
            low, high = _resolve(low, available, package), _resolve(high, available, package)
            span = [v for v in available if version_key(low) <= version_key(v) <= version_key(high)]
            if minor_only:
                newest = {}
                for v in span:
                    newest[version_key(v)[:2]] = v
                span = sorted(newest.values(), key=version_key)
            chosen += span
        else:
            chosen.append(_resolve(part, available, package))
    return sorted(dict.fromkeys(chosen), key=version_key)


def _resolve(value: str, available: list[str], package: str) -> str:
    if value == LATEST:
        return available[-1]
    check_version(package, value)
    if value not in available:
        near = [v for v in available if v.split(".")[:2] == value.split(".")[:2]]
        raise MatrixError(f"{package} {value} is not a release on PyPI; releases of that line: "
                          f"{', '.join(near) or 'none'}")
    return value


def cells(transformers: list[str], peft: list[str], trl: str) -> list[Cell]:
    return [Cell(t, p, trl, trl_why="sweep: the newest trl (declares transformers>=4.56.2)")
            for t in transformers for p in peft]


# -- features -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Feature:
    name: str
    stages: tuple[str, ...]          # stages that must have run ok (where the case has them)
    rules: tuple[str, ...] = ()      # rules that must hold wherever they apply
    quant: str | None = None         # only cases of this quantization


FEATURES: tuple[Feature, ...] = (
    Feature("4-bit experts at load", ("load",), ("experts_4bit", "routers_4bit"), quant="nf4"),
    Feature("train", ("lora", "train"), ("loss_falls", "grad_norm", "expert_lora_trains")),
    Feature("merge", ("merge",), ("merge_changes_experts", "kl_merged", "merge_moves_4bit")),
    Feature("export exact", ("export", "export_reload"),
            ("export_complete", "export_16bit", "kl_export_fp32", "export_rounding", "kl_export",
             "export_carries_adapter")),
    Feature("adapter reload", ("adapter_reload",), ("kl_adapter", "samples_adapter")),
    Feature("adapters across versions", ("foreign_adapters",), ("kl_foreign",)),
    Feature("4.x checkpoints", ("prequantized_v4",), ("prequantized_v4",)),
    Feature("RL cycles", ("rl_cycles",), ("rl_cycles_exact",)),
    Feature("QLoRA recipe", ("load", "lora", "train", "export_reload"),
            ("recipe_checkpointing", "recipe_optimizer_8bit", "gc_grads_equal"), quant="nf4-recipe"),
)
OK, NO_CASE = "ok", "-"
_RULES = {r.name: r for r in verdict.RULES}


def feature_outcome(doc: dict, feature: Feature) -> str:
    """'ok', '-' (no case of the run exercises it), or 'FAIL: <first cause>' for one results document."""
    if doc.get("status") != "ran":
        return f"FAIL: {doc.get('status')}"
    seen = False
    for case in doc.get("cases", []):
        if feature.quant and case.get("quant") != feature.quant:
            continue
        stages = case.get("stages", {})
        present = [s for s in feature.stages if s in stages]
        if not present or any(stages[s].get("status") in ("skipped", "unavailable") for s in present):
            continue
        seen = True
        for name in present:
            status = stages[name].get("status")
            if status != "ok":
                err = stages[name].get("error", {})
                return f"FAIL: {name} {status}: {err.get('type', '')} {str(err.get('message', ''))[:60]}".strip()
        for name in feature.rules:
            rule = _RULES[name]
            if rule.applies(case) and not rule.holds(case):
                return f"FAIL: rule {name}"
    return OK if seen else NO_CASE


@dataclass
class SweepRun:
    cells: list[Cell]
    seconds: dict[str, float] = field(default_factory=dict)


def run(run_cells: list[Cell], matrix: Matrix, venvs: Path, results: Path, work: Path, archs, quants,
        log=print) -> SweepRun:
    """Install and run each cell in its own venv, printing progress with elapsed time and an estimate."""
    from .. import install, runner

    started = time.monotonic()
    out = SweepRun(run_cells)
    for index, cell in enumerate(run_cells, 1):
        t0 = time.monotonic()
        python = install.ensure_venv(venvs / cell.name.replace(".", "-"), matrix.environment["python"])
        try:
            info = install.install(python, cell, matrix.environment, float(matrix.run["install_timeout_s"]))
        except install.InstallError as exc:
            runner.write_install_failure(cell, exc.status, exc.message, results)
            verdict_text = exc.status
        else:
            paths = runner.run_modes(cell, ("off", "on"), python, matrix, results, work, archs, quants, info)
            verdict_text = ", ".join(_summary(p) for p in paths)
        out.seconds[cell.name] = time.monotonic() - t0
        elapsed = time.monotonic() - started
        eta = elapsed / index * (len(run_cells) - index)
        log(f"sweep [{index}/{len(run_cells)}] {cell.name}: {verdict_text} ({out.seconds[cell.name]:.0f} s; "
            f"elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)")
    return out


def _summary(path: Path) -> str:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    verdicts = [verdict.judge(c)[0] for c in doc.get("cases", [])]
    mode = "shims" if doc["mode"] == "on" else "native"
    return f"{mode} {verdicts.count(verdict.PASS)}/{len(verdicts)} pass"


# -- the report ----------------------------------------------------------------------------------------------
def _by_cell(docs: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for doc in docs:
        out.setdefault(doc["cell"]["name"], {})[doc["mode"]] = doc
    return out


def _cell_order(docs: list[dict]) -> list[dict]:
    cells_ = {d["cell"]["name"]: d["cell"] for d in docs}

    def key(cell):
        t = cell["transformers"]
        return (cell["peft"], version_key(t) if t != LATEST else (999,))
    return sorted(cells_.values(), key=key)


def feature_grid(docs: list[dict]) -> list[dict]:
    """One row per cell: transformers, peft, then per feature 'native / shims' outcomes."""
    runs = _by_cell(docs)
    rows = []
    for cell in _cell_order(docs):
        modes = runs[cell["name"]]
        row = {"transformers": cell["transformers"], "peft": cell["peft"]}
        for feature in FEATURES:
            native = feature_outcome(modes["off"], feature) if "off" in modes else "not run"
            shims = feature_outcome(modes["on"], feature) if "on" in modes else "not run"
            row[feature.name] = f"{_short(native)} / {_short(shims)}"
        rows.append(row)
    return rows


def _short(outcome: str) -> str:
    return outcome if len(outcome) <= 70 else outcome[:67] + "..."


def necessity_ranges(docs: list[dict]) -> dict[str, list[tuple[str, str, str, str]]]:
    """shim -> [(peft, first release, last release, status)]: consecutive transformers releases (per peft) with the
    same necessity status merged into one range."""
    entries = necessity.necessity(docs, necessity.load_symptoms())
    cells_ = _cell_order(docs)
    out = {}
    for shim, per_cell in entries.items():
        spans: list[list[str]] = []
        for cell in cells_:
            entry = per_cell.get(cell["name"])
            if entry is None:
                continue
            status = entry.label.split(" (")[0]
            if spans and spans[-1][0] == cell["peft"] and spans[-1][3] == status:
                spans[-1][2] = cell["transformers"]
            else:
                spans.append([cell["peft"], cell["transformers"], cell["transformers"], status])
        out[shim] = [tuple(s) for s in spans]
    return out


RANGE_WORDS = {necessity.NEEDED: "needed", necessity.NOT_NEEDED: "unnecessary (retirement candidate)",
               necessity.BROKEN: "BROKEN"}


def render(docs: list[dict], problems, picture: str | None, title: str) -> str:
    import pandas as pd

    grid = pd.DataFrame(feature_grid(docs))
    lines = [f"# moe-shims version sweep ({title})", "",
             "Does a feature work on a release? Each cell: `native / shims` (`ok`; `FAIL: <first failing stage or "
             "rule>`; `-` no case of the sweep exercises it there). Generated by `nox -s sweep` (harness/campaigns/sweep.py) "
             "from reports/sweep/results.", ""]
    if grid.empty:
        lines += ["No sweep results.", ""]
    else:
        lines += [grid.to_markdown(index=False), ""]
        if picture:
            lines += [f"![feature grid]({picture})", ""]
        lines += ["## Where each shim is needed", "",
                  "Per peft version, consecutive transformers releases with the same status (harness/reporting/necessity.py: "
                  "needed = the native run shows the symptom the shim fixes and the shimmed run does not).", ""]
        rows, quiet = [], []
        for shim, spans in necessity_ranges(docs).items():
            shown = [span for span in spans if span[3] in RANGE_WORDS]
            if not shown:
                quiet.append(f"{shim} ({', '.join(sorted({span[3] for span in spans}))})")
            for peft, low, high, status in shown:
                rows.append({"shim": shim, "peft": peft, "transformers": low if low == high else f"{low} .. {high}",
                             "status": RANGE_WORDS[status]})
        lines += [pd.DataFrame(rows).to_markdown(index=False) if rows else "No shim's symptom was seen.", ""]
        if quiet:
            lines += ["Shims whose symptom the sweep's cases cannot show or did not reach (the report's necessity "
                      "section says why per cell): " + "; ".join(quiet) + ".", ""]
    if problems:
        lines += ["## Unusable results files", ""] + [f"- {p.file}: {p.problem}" for p in problems] + [""]
    return "\n".join(lines)


def draw(docs: list[dict], out: Path) -> Path:
    """The feature grid as a picture: rows cells, columns feature x (native, shims); green ok, red FAIL, grey -."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = feature_grid(docs)
    labels = [f"tf {r['transformers']} / peft {r['peft']}" for r in rows]
    cols = [f"{f.name} ({m})" for f in FEATURES for m in ("native", "shims")]
    values = []
    for r in rows:
        line = []
        for f in FEATURES:
            for part in r[f.name].split(" / "):
                line.append(1.0 if part == OK else 0.5 if part in (NO_CASE, "not run") else 0.0)
        values.append(line)
    fig, ax = plt.subplots(figsize=(max(8, len(cols) * 0.45), max(3, len(rows) * 0.28)))
    ax.imshow(values or [[0.5]], cmap=matplotlib.colors.ListedColormap(["#d9534f", "#cccccc", "#5cb85c"]),
              vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title("moe-shims sweep: green ok, red FAIL, grey not exercised")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def write(results: Path | list[Path], out: Path, title: str = "transformers 5.x") -> Path:
    import os

    from ..reporting.merge import load_many
    from ..results import write_text_atomic

    folders = results if isinstance(results, list) else [results]
    merged = load_many([Path(f) for f in folders])
    picture = None
    if merged.docs:
        png = draw(merged.docs, out.with_suffix(".png"))
        picture = os.path.relpath(png, out.parent)
    write_text_atomic(out, render(merged.docs, merged.problems, picture, title))
    return out


def case_verdict(doc: dict, case: str, check: str | None = None) -> tuple[str, str]:
    """(outcome, what made it) of one case in one results document. ``check``: None for the case's verdict (what made
    it: the first failing stage or rule), "stage:NAME" for that stage's status, "rule:NAME" for that rule's pass /
    fail / n/a (what made it: the stage's error)."""
    kind, name = parse_check(check) if check is not None else (None, None)
    if doc.get("status") != "ran":
        return doc.get("status", "?"), (doc.get("error") or {}).get("message", "")[:200]
    record = next((r for r in doc.get("cases", []) if case_key(r) == case), None)
    if record is None:
        return "missing", f"no case {case} in this run"
    if check is None:
        result, reasons = verdict.judge(record)
        return result, (reasons[0] if reasons else "")
    if kind == "stage":
        stage = record.get("stages", {}).get(name, {})
        err = stage.get("error", {})
        return stage.get("status", "absent"), f"{err.get('type', '')}: {err.get('message', '')}"[:200] if err else ""
    rule = _RULES[name]
    if not rule.applies(record):
        return "n/a", "the rule does not apply (a stage it needs did not run)"
    return ("pass", "") if rule.holds(record) else ("fail", rule.description[:200])


def parse_check(check: str) -> tuple[str, str]:
    kind, _, name = check.partition(":")
    if kind == "stage" and name:
        return kind, name
    if kind == "rule" and name in _RULES:
        return kind, name
    raise MatrixError(f"--check {check!r}: use stage:NAME or rule:NAME (rules: {', '.join(_RULES)})")
