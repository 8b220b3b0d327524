"""The mutation check: plant each bug listed in matrix.toml, run its cell with the shims on, and count how
many the verdict rules catch. A harness that stays green with a broken shim is not testing anything."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import verdict
from ..matrix import Matrix
from ..results import write_json_atomic
from ..runner import run_cell, shims_version

MUTATION_ENV = "MOE_SHIMS_MUTATION"


def red_cases(results_file: Path) -> dict[str, list[str]]:
    """{case: reasons} for every case that does not pass (n/a excluded)."""
    doc = json.loads(Path(results_file).read_text())
    out = {}
    for case in doc["cases"]:
        v, reasons = verdict.judge(case)
        if v not in (verdict.PASS, verdict.NA):
            out[case["case"]] = [r.replace("\n", " ") for r in reasons] or [v]
    return out


def judge_against(control: dict[str, list[str]], mutant: dict[str, list[str]]) -> dict:
    """A mutation is caught when a case turns red that the unmutated control run passed, or a red case gains a
    reason: a case that is red anyway (a known gap) cannot catch anything."""
    newly = {c: r for c, r in mutant.items() if c not in control}
    worse = {c: [x for x in r if x not in control[c]] for c, r in mutant.items() if c in control}
    worse = {c: r for c, r in worse.items() if r}
    caught = {**newly, **worse}
    return {"caught": bool(caught), "red_cases": [{"case": c, "reasons": r[:3]} for c, r in caught.items()]}


def run_mutations(matrix: Matrix, python: str, out_dir: Path, work_root: Path, names=None,
                  pythons: dict[str, str] | None = None) -> dict:
    """Plant each mutation in its cell (matrix.mutation_groups) after an unmutated control run of that cell and its
    cases. ``python`` runs the default cell; ``pythons`` maps other cells' names to their interpreters."""
    default = matrix.mutation_cell().name
    control_red, outcomes = {}, {}
    for group in matrix.mutation_groups(names):
        cell = group["cell"]
        interp = python if cell.name == default else (pythons or {})[cell.name]
        where = out_dir if cell.name == default else out_dir / cell.name
        control = _red_run(matrix, group, interp, where / "control", work_root)
        prefix = "" if cell.name == default else f"{cell.name}: "
        control_red.update({f"{prefix}{c}": r[:2] for c, r in control.items()})
        for name in group["names"]:
            os.environ[MUTATION_ENV] = name
            try:
                mutant = _red_run(matrix, group, interp, where / name.replace(":", "_"), work_root)
            finally:
                del os.environ[MUTATION_ENV]
            outcomes[name] = {**judge_against(control, mutant), "cell": cell.name}
    return {"shims_version": shims_version(), "cell": default, "when": time.time(),
            "planted": len(outcomes), "caught": sum(o["caught"] for o in outcomes.values()),
            "control_red": control_red, "mutations": outcomes}


def _red_run(matrix: Matrix, group: dict, python: str, results_dir: Path, work_root: Path) -> dict[str, list[str]]:
    """One run of a mutation group's cell and cases with the shims on: its red cases."""
    return red_cases(run_cell(group["cell"], "on", python, matrix, results_dir, work_root, archs=group["archs"],
                              quants=group["quants"]))


def write_score(score: dict, path: Path) -> None:
    write_json_atomic(path, score)


def render_section(path: Path) -> str:
    """Markdown for COMPAT.md: caught / planted and what caught each mutation."""
    if not Path(path).exists():
        return "Not run yet (`nox -s mutations`)."
    score = json.loads(Path(path).read_text())
    control = score.get("control_red", {})
    lines = [f"Score: **{score['caught']} / {score['planted']}** planted bugs caught "
             f"(cell {score['cell']}, shims {score['shims_version']}). A mutation counts as caught only when a case "
             "that the unmutated control run passes turns red (or a red case gains a reason); control run red "
             f"cases: {', '.join(sorted(control)) or 'none'}.", "",
             "| mutation | caught | red cases (first reason) |", "| --- | --- | --- |"]
    for name, o in score["mutations"].items():
        first = "; ".join(f"{r['case']}: {r['reasons'][0]}"[:160] for r in o["red_cases"][:2])
        where = f" (cell {o['cell']})" if o.get("cell", score["cell"]) != score["cell"] else ""
        lines.append(f"| `{name}`{where} | {'yes' if o['caught'] else '**no**'} | "
                     f"{first or 'all cases stayed green'} |")
    return "\n".join(lines)
