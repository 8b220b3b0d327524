"""The mutation check: plant each bug listed in matrix.toml, run its cell with the shims on, and count how
many the verdict rules catch. A harness that stays green with a broken shim is not testing anything."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import verdict
from .matrix import Matrix
from .results import write_json_atomic
from .runner import run_cell, shims_version

MUTATION_ENV = "MOE_SHIMS_MUTATION"


def judge_run(results_file: Path) -> dict:
    doc = json.loads(Path(results_file).read_text())
    red = []
    for case in doc["cases"]:
        v, reasons = verdict.judge(case)
        if v not in (verdict.PASS, verdict.NA):
            red.append({"case": case["case"], "verdict": v, "reasons": reasons[:3]})
    return {"caught": bool(red), "red_cases": red, "cases": len(doc["cases"])}


def run_mutations(matrix: Matrix, python: str, out_dir: Path, work_root: Path, names=None) -> dict:
    names = list(names or matrix.mutations["planted"])
    cell = matrix.mutation_cell()
    outcomes = {}
    for name in names:
        os.environ[MUTATION_ENV] = name
        try:
            path = run_cell(cell, "on", python, matrix, out_dir / name.replace(":", "_"), work_root,
                            archs=matrix.mutations.get("archs"))
        finally:
            del os.environ[MUTATION_ENV]
        outcomes[name] = judge_run(path)
    score = {"shims_version": shims_version(), "cell": cell.name, "when": time.time(),
             "planted": len(outcomes), "caught": sum(o["caught"] for o in outcomes.values()),
             "mutations": outcomes}
    return score


def write_score(score: dict, path: Path) -> None:
    write_json_atomic(path, score)


def render_section(path: Path) -> str:
    """Markdown for COMPAT.md: caught / planted and what caught each mutation."""
    if not Path(path).exists():
        return "Not run yet (`nox -s mutations`)."
    score = json.loads(Path(path).read_text())
    lines = [f"Score: **{score['caught']} / {score['planted']}** planted bugs caught "
             f"(cell {score['cell']}, shims {score['shims_version']}).", "",
             "| mutation | caught | red cases (first reason) |", "| --- | --- | --- |"]
    for name, o in score["mutations"].items():
        first = "; ".join(f"{r['case']}: {r['reasons'][0] if r['reasons'] else r['verdict']}"[:160]
                          for r in o["red_cases"][:2])
        lines.append(f"| `{name}` | {'yes' if o['caught'] else '**no**'} | {first or 'all cases stayed green'} |")
    return "\n".join(lines)
