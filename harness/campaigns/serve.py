"""``nox -s serve``: the serving cell ([serve] in matrix.toml) -- its venv with the engine, its cases with the
serving stages (cases/serve.py), its results under reports/serve/results and its report, reports/SERVE.md.

Shims on only: the serving stages serve the shims' exports and adapters (a native 4-bit merge saves a 4-bit
checkpoint, which is not what the stages compare). An install that fails is a row saying so, like any cell's.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import install, runner, verdict
from .reproduce import environment
from ..install import InstallError
from ..matrix import Matrix
from ..results import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "reports" / "serve" / "results"
PLANTED = REPO / "reports" / "serve" / "planted.json"
REPORT = REPO / "reports" / "SERVE.md"
TITLE = "serving"
MUTATION_ENV = "MOE_SHIMS_MUTATION"  # read by cases/run_cell.py (cases/mutations.py)
# the rules a planted export bug must turn red: the served export against the trained model
SERVED_EXPORT_RULES = ("serve_fp32",)


def known_mutations() -> list[str]:
    from cases.mutations import MUTATIONS  # standard library only

    return list(MUTATIONS)


def prepare(matrix: Matrix, venv: Path, log=print) -> tuple[str, dict]:
    """The serving cell's interpreter, installed: the cell's pins and the engine resolved together, then the
    packages [serve] uninstall names removed. Raises InstallError."""
    cell = matrix.serve_cell()
    python = install.ensure_venv(venv, matrix.environment["python"])
    info = install.install(python, cell, matrix.environment, float(matrix.run["install_timeout_s"]),
                           extra=(matrix.serve["engine"],))
    info["engine"] = matrix.serve["engine"]
    info["uninstalled"] = install.uninstall(python, matrix.serve.get("uninstall", ()), 300)
    log(f"serve: {cell.name} + {matrix.serve['engine']} installed in {info['seconds']} s")
    return python, info


def run(matrix: Matrix, venv: Path, results: Path, work: Path, archs=None, quants=None, log=print,
        plant: str | None = None) -> Path:
    """Install and run the serving cell (shims on); returns its results file. ``plant``: a mutation of
    cases/mutations.py planted in every case (the check that the serving rules see it)."""
    with environment({MUTATION_ENV: plant} if plant else {}):  # the cell's process inherits it
        return _run(matrix.serving(), venv, results, work, archs, quants, log)


def _run(serving: Matrix, venv: Path, results: Path, work: Path, archs, quants, log) -> Path:
    archs = serving.check_archs(archs or serving.serve["archs"])
    quants = serving.check_quants(quants or serving.serve["quants"])
    results.mkdir(parents=True, exist_ok=True)
    cell = serving.serve_cell()
    try:
        python, info = prepare(serving, venv, log)
    except InstallError as exc:
        log(f"serve: cannot install {cell.name} + {serving.serve['engine']}: {exc.status}")
        paths = runner.write_install_failure(cell, exc.status, exc.message, results)
        return paths[-1]
    log(f"serve: {', '.join(archs)} x {', '.join(quants)} -> {results}")
    return runner.run_cell(cell, "on", python, serving, results, work, archs, quants, install=info)


def planted_summary(results_file: Path, mutation: str) -> dict:
    """Which cases of a planted run turned red at a served-export rule (``caught``), from its results file."""
    doc = json.loads(Path(results_file).read_text(encoding="utf-8"))
    cases = {}
    for case in doc.get("cases", []):
        result, reasons = verdict.judge(case)
        red = [rule for rule in SERVED_EXPORT_RULES if any(r.startswith(f"rule {rule}:") for r in reasons)]
        cases[case["case"]] = {"verdict": result, "served_rules_red": red, "reasons": reasons,
                               "kl_serve_fp32": case.get("metrics", {}).get("kl_serve_fp32")}
    caught = bool(cases) and all(c["served_rules_red"] for c in cases.values())
    return {"mutation": mutation, "caught": caught, "status": doc.get("status"), "cases": cases}


def planted_section(planted: dict) -> str:
    lines = ["## A planted export bug", "",
             f"`nox -s serve -- --plant {planted['mutation']}` (cases/mutations.py) plants it in every case: "
             f"**{'caught' if planted['caught'] else 'NOT CAUGHT'}** by the served-export rules "
             f"({', '.join(SERVED_EXPORT_RULES)}).", "",
             "| case | verdict | served-export rules red | KL(trained in float32 \\|\\| served float32 export) |",
             "| --- | --- | --- | --- |"]
    for name, case in planted["cases"].items():
        kl = case["kl_serve_fp32"]
        kl_text = f"{kl:.3g}" if isinstance(kl, (int, float)) else "-"
        lines.append(f"| {name} | {case['verdict']} | {', '.join(case['served_rules_red']) or 'none'} | {kl_text} |")
    return "\n".join(lines) + "\n"


def write_report(results: Path, out: Path, planted: Path = PLANTED) -> Path:
    """SERVE.md: the harness's report of the serving results (rows, rules, failures), then the planted check."""
    from ..reporting import report

    report.write_report(results, out, TITLE, history_path=Path(results).parent / "history.jsonl",
                        heatmap_path=Path(results).parent / "heatmap.png")
    if Path(planted).is_file():
        text = out.read_text(encoding="utf-8")
        write_text_atomic(out, text.rstrip("\n") + "\n\n" + planted_section(json.loads(Path(planted).read_text())))
    return out


def red_cases(results_file: Path) -> dict[str, list[str]]:
    """Cases of a serving results file that did not pass (an install failure is one such row), with their reasons."""
    doc = json.loads(Path(results_file).read_text(encoding="utf-8"))
    if doc.get("status") != "ran":
        return {"(all)": [f"{doc.get('status')}: {(doc.get('error') or {}).get('message', '')[-500:]}"]}
    judged = {case["case"]: verdict.judge(case) for case in doc.get("cases", [])}
    return {name: reasons for name, (result, reasons) in judged.items() if result != verdict.PASS}


def write_planted(results_file: Path, mutation: str, out: Path = PLANTED) -> dict:
    summary = planted_summary(results_file, mutation)
    write_json_atomic(out, summary)
    return summary
