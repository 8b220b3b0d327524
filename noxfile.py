"""Sessions of the moe-shims harness. The version matrix is data: harness/matrix.toml.

    nox -s e2e                      release lanes, shims off and on, then reports/COMPAT.md
    nox -s "e2e(tf5.6.2-peft0.19.1-trl1.4.0)"          one lane
    nox -s e2e -- --arch qwen3_moe --quant nf4        lanes restricted to some cases
    nox -s cell -- --transformers 5.6.2 --peft 0.19.1 --trl 1.4.0   an ad-hoc cell
    nox -s e2e_full                 the full cross product -> reports/COMPAT-full.md
    nox -s report                   re-render the report from results files alone
    nox -s tests                    unit and fault-injection tests, in each test lane's venv
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from harness import cli, install, runner  # noqa: E402
from harness.matrix import Cell, MatrixError, load_matrix  # noqa: E402

MATRIX = load_matrix()
PYTHON = MATRIX.environment["python"]
RESULTS = REPO / "reports" / "results"
FULL_RESULTS = REPO / "reports" / "full" / "results"
WORK = REPO / ".cache" / "e2e"
REPORT_DEPS = ("pandas", "tabulate", "matplotlib")

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["e2e"]


def _venv_python(session: nox.Session) -> str:
    return str(Path(session.virtualenv.location) / "bin" / "python")


def _options(session: nox.Session):
    try:
        return cli.parse_cell_options(session.posargs, MATRIX)
    except MatrixError as exc:
        session.error(str(exc))


def _run_cell(session: nox.Session, cell: Cell, results_dir: Path, opts) -> None:
    python = _venv_python(session)
    try:
        info = install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        runner.write_install_failure(cell, exc.status, exc.message, results_dir)
        session.warn(f"{cell.name}: {exc.status}: {exc.message.splitlines()[-1] if exc.message else ''}")
        return
    for path in runner.run_modes(cell, opts.mode, python, MATRIX, results_dir, WORK, opts.arch, opts.quant, info):
        session.log(f"{cell.name}: {path.relative_to(REPO)}")


@nox.session(python=PYTHON)
@nox.parametrize("cell", [nox.param(c, id=c.name) for c in MATRIX.lanes])
def e2e(session: nox.Session, cell: Cell) -> None:
    """One release lane: install its pins, run every case with shims off and on."""
    _run_cell(session, cell, RESULTS, _options(session))
    session.notify("report", [])


@nox.session(python=PYTHON, default=False)
@nox.parametrize("cell", [nox.param(c, id=c.name) for c in MATRIX.full_cells()])
def e2e_full(session: nox.Session, cell: Cell) -> None:
    """One cell of the full transformers x peft x trl cross product."""
    _run_cell(session, cell, FULL_RESULTS, _options(session))
    session.notify("report_full", [])


@nox.session(python=PYTHON, default=False)
def cell(session: nox.Session) -> None:
    """An ad-hoc cell: -- --transformers X --peft Y --trl Z [--arch a,b] [--quant nf4] [--mode on]."""
    opts = _options(session)
    try:
        adhoc = cli.adhoc_cell(opts)
    except MatrixError as exc:
        session.error(str(exc))
    _run_cell(session, adhoc, RESULTS, opts)
    session.notify("report", [])


@nox.session(python=PYTHON, default=False)
def mutations(session: nox.Session) -> None:
    """Plant each bug listed under [mutations] in matrix.toml and record how many the harness catches."""
    from harness import mutations as mut

    cell = MATRIX.mutation_cell()
    python = _venv_python(session)
    try:
        install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install the mutation cell {cell.name}: {exc.message}")
    score = mut.run_mutations(MATRIX, python, WORK / "mutations", WORK, session.posargs or None)
    mut.write_score(score, REPO / "reports" / "mutations.json")
    session.log(f"mutations caught: {score['caught']} / {score['planted']}")
    session.notify("report", [])


@nox.session(python=PYTHON, default=False)
def report(session: nox.Session) -> None:
    """Render reports/COMPAT.md from reports/results alone."""
    session.install(*REPORT_DEPS)
    session.run("python", "-m", "harness", "report", "--results", str(RESULTS),
                "--out", str(REPO / "reports" / "COMPAT.md"), *session.posargs)


@nox.session(python=PYTHON, default=False)
def report_full(session: nox.Session) -> None:
    session.install(*REPORT_DEPS)
    session.run("python", "-m", "harness", "report", "--results", str(FULL_RESULTS),
                "--out", str(REPO / "reports" / "COMPAT-full.md"), "--title", "full cross product",
                *session.posargs)


@nox.session(python=PYTHON, default=False)
@nox.parametrize("cell", [nox.param(c, id=c.name) for c in MATRIX.test_cells()])
def tests(session: nox.Session, cell: Cell) -> None:
    """Unit, property and fault-injection tests, in a venv with this test lane's ML pins."""
    python = _venv_python(session)
    try:
        install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install test lane {cell.name}: {exc.message}")
    session.install("pytest", "hypothesis", *REPORT_DEPS)
    # The harness tests do not depend on the ML versions: run them in the first test lane only.
    paths = [] if cell == MATRIX.test_lanes[0] else ["tests/shims"]
    session.run("python", "-m", "pytest", "-q", *(session.posargs or paths), env={"PYTHONPATH": str(REPO)})
