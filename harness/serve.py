"""``nox -s serve``: the serving cell ([serve] in matrix.toml) -- its venv with the engine, its cases with the
serving stages (cases/serve.py), its results under reports/serve/results and its report, reports/SERVE.md.

Shims on only: the serving stages serve the shims' exports and adapters (a native 4-bit merge saves a 4-bit
checkpoint, which is not what the stages compare). An install that fails is a row saying so, like any cell's.
"""

from __future__ import annotations

from pathlib import Path

from . import install, runner
from .install import InstallError
from .matrix import Matrix

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "reports" / "serve" / "results"
REPORT = REPO / "reports" / "SERVE.md"
TITLE = "serving"


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


def run(matrix: Matrix, venv: Path, results: Path, work: Path, archs=None, quants=None, log=print) -> Path:
    """Install and run the serving cell (shims on); returns its results file."""
    serving = matrix.serving()
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
