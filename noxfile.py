"""Sessions of the moe-shims harness. The version matrix is data: harness/matrix.toml.

    nox -s e2e                      release lanes, shims off and on, then reports/COMPAT.md
    nox -s "e2e(tf5.6.2-peft0.19.1-trl1.4.0)"          one lane
    nox -s e2e -- --arch qwen3_moe --quant nf4        lanes restricted to some cases
    nox -s cell -- --transformers 5.6.2 --peft 0.19.1 --trl 1.4.0   an ad-hoc cell
    nox -s e2e_full                 the full cross product -> reports/COMPAT-full.md
    nox -s report                   re-render the report from results files alone
    nox -j auto -s lanes            every release lane in parallel (own venv, work folder, results file each),
                                    then the report; set MOE_SHIMS_JOBS=1 so cells x modes do not oversubscribe
    nox -s gate                     release gate: reports/results vs reports/baseline.json (exit 0/1/2)
    nox -s sweep -- --transformers 5.0.0..latest --peft 0.19.1,latest   every release in a range -> reports/SWEEP.md
    nox -s bisect -- --case qwen3_moe/nf4 --mode native --package transformers --good 5.0.0 --bad latest
                                    the first release where that case's verdict changes, in O(log n) cells
    nox -s reproduce                the newest lane's nf4 / recipe cases under two CPU kernel sets + thread counts:
                                    identical verdicts and rule outcomes, or exit 1 -> reports/REPRODUCE.md
    nox -s serve                    the shims' exports and adapters served by vLLM (CPU build, its own venv) ->
                                    reports/SERVE.md; -- --arch qwen3_moe limits the archs;
                                    -- --plant export_expert_delta_dropped: the served-export rules must turn red
    nox -s baseline                 accept reports/results as the new baseline (explicit, never a side effect)
    nox -s release                  the gate, then sdist + wheel with `python -m build` into dist/
    nox -s tests                    unit and fault-injection tests, in each test lane's venv
    nox -s second_pass              re-run the stages that found nothing published yet (queued by e2e)
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
BASELINE = REPO / "reports" / "baseline.json"
FULL_RESULTS = REPO / "reports" / "full" / "results"
WORK = REPO / ".cache" / "e2e"
REPORT_DEPS = ("pandas", "tabulate", "matplotlib")

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["e2e"]


def _params(cells) -> list:
    """Sessions are parametrized by cell name (nox writes its parameters to JSON in parallel runs); each
    session maps the name back to its Cell through its own table below."""
    return [nox.param(c.name, id=c.name) for c in cells]


LANES = {c.name: c for c in MATRIX.lanes}
FULL = {c.name: c for c in MATRIX.full_cells()}
TEST_LANES = {c.name: c for c in MATRIX.test_cells()}


def _venv_python(session: nox.Session) -> str:
    return str(Path(session.virtualenv.location) / "bin" / "python")


def _install_or_stop(session: nox.Session, cell: Cell, what: str) -> str:
    """Install ``cell``'s pins into the session's venv and return its interpreter; a cell that cannot be installed
    ends the session with the resolver's message."""
    python = _venv_python(session)
    try:
        install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install {what} {cell.name}: {exc.message}")
    return python


def _sibling_venv(session: nox.Session, cell: Cell, what: str) -> str:
    """A venv next to this session's for a second cell (the session's own holds its first), installed with the
    cell's pins; returns its interpreter."""
    location = Path(session.virtualenv.location)
    python = install.ensure_venv(location.with_name(f"{location.name}-{cell.name.replace('.', '-')}"), PYTHON)
    try:
        install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install {what} {cell.name}: {exc.message}")
    return python


def _options(session: nox.Session):
    try:
        return cli.parse_cell_options(session.posargs, MATRIX)
    except MatrixError as exc:
        session.error(str(exc))


def _notify(session: nox.Session, target: str) -> None:
    """Queue ``target`` after this session, except where nox runs each session on its own (--parallel,
    --no-dependencies: a CI job per cell), which forbids notify(); there `lanes` (requires=) or a final job
    renders the report once, after every cell."""
    try:
        session.notify(target, [])
    except ValueError as exc:
        if "no-dependencies" not in str(exc):
            raise
        session.log(f"not queueing {target}: sessions run independently here; it runs after all of them")


def _run_cell(session: nox.Session, cell: Cell, results_dir: Path, opts) -> None:
    python = _venv_python(session)
    try:
        info = install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        runner.write_install_failure(cell, exc.status, exc.message, results_dir)
        session.warn(f"{cell.name}: {exc.status}: {exc.message.splitlines()[-1] if exc.message else ''}")
        return
    matrix = MATRIX.on_device(opts.device)
    for path in runner.run_modes(cell, opts.mode, python, matrix, results_dir, WORK, opts.arch, opts.quant, info):
        session.log(f"{cell.name}: {path.relative_to(REPO)}")


# allow_parallel: each lane has its own venv, work folder (.cache/e2e/<cell>) and results files; the tiny-model
# cache and the adapter store (.cache/e2e/adapters) are shared but written by atomic rename, so a cell sees whole
# entries only (which foreign adapters it sees depends on what finished before it, in parallel as in sequence).
# Under --parallel the report runs once, via `lanes`.
@nox.session(python=PYTHON, allow_parallel=True)
@nox.parametrize("cell", _params(MATRIX.lanes))
def e2e(session: nox.Session, cell: str) -> None:
    """One release lane: install its pins, run every case with shims off and on."""
    _run_cell(session, LANES[cell], RESULTS, _options(session))
    _notify(session, "second_pass")  # queued once, before the report: after every lane of this run
    _notify(session, "report")


@nox.session(python=PYTHON, default=False, allow_parallel=True)
@nox.parametrize("cell", _params(MATRIX.full_cells()))
def e2e_full(session: nox.Session, cell: str) -> None:
    """One cell of the full transformers x peft x trl cross product."""
    _run_cell(session, FULL[cell], FULL_RESULTS, _options(session))
    _notify(session, "second_pass")
    _notify(session, "report_full")


@nox.session(python=PYTHON, default=False, requires=["e2e"])
def lanes(session: nox.Session) -> None:
    """Every release lane (in parallel under `nox -j N`), then the second pass and the report, once, after all
    of them."""
    _second_pass(session)
    session.install(*REPORT_DEPS)
    session.run("python", "-m", "harness", "report", "--results", str(RESULTS),
                "--out", str(REPO / "reports" / "COMPAT.md"))


@nox.session(python=PYTHON, default=False)
def cell(session: nox.Session) -> None:
    """An ad-hoc cell: -- --transformers X --peft Y --trl Z [--arch a,b] [--quant nf4] [--mode on]."""
    opts = _options(session)
    try:
        adhoc = cli.adhoc_cell(opts)
    except MatrixError as exc:
        session.error(str(exc))
    _run_cell(session, adhoc, RESULTS, opts)
    session.notify("second_pass", [])
    session.notify("report", [])


def _second_pass(session: nox.Session) -> None:
    for summary in runner.run_second_pass(WORK):
        session.log(f"second pass: {Path(summary['results']).name}: {len(summary['cases'])} case(s) re-ran "
                    f"{', '.join(summary['stages']) or 'nothing'} ({summary['seconds']} s)")


# python=False: the harness is standard library only; each registered pass runs in its cell's own venv
@nox.session(python=False, default=False)
def second_pass(session: nox.Session) -> None:
    """After the lanes: re-run the stages that found nothing published yet when their lane ran (a fresh run's 4.57
    lanes go first, so their per_expert_adapters stage has no 5.x adapter to load), into the lanes' results files."""
    _second_pass(session)


@nox.session(python=PYTHON, default=False)
def mutations(session: nox.Session) -> None:
    """Plant each bug listed under [mutations] in matrix.toml and record how many the harness catches."""
    from harness.campaigns import mutations as mut

    python = _install_or_stop(session, MATRIX.mutation_cell(), "the mutation cell")
    others = {}  # cells of [mutations.elsewhere]: a venv beside this session's each
    for group in MATRIX.mutation_groups(session.posargs or None):
        if group["cell"].name != MATRIX.mutation_cell().name:
            others[group["cell"].name] = _sibling_venv(session, group["cell"], "a mutation cell")
    score = mut.run_mutations(MATRIX, python, WORK / "mutations", WORK, session.posargs or None, others)
    mut.write_score(score, REPO / "reports" / "mutations.json")
    session.log(f"mutations caught: {score['caught']} / {score['planted']}")
    session.notify("report", [])


@nox.session(python=PYTHON, default=False)
def reproduce(session: nox.Session) -> None:
    """The kernel-variation check (harness/campaigns/reproduce.py): -- [--arch a,b] [--quant q] [--transformers X --peft Y
    --trl Z]; default: the newest release lane's nf4 and nf4-recipe cases."""
    from harness.campaigns import reproduce as repro

    opts = _options(session)
    cell = MATRIX.lanes[-1]
    if any(getattr(opts, p) is not None for p in ("transformers", "peft", "trl")):
        try:
            cell = cli.adhoc_cell(opts)
        except MatrixError as exc:
            session.error(str(exc))
    python = _venv_python(session)
    try:
        info = install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install {cell.name}: {exc.message}")
    quants = opts.quant if "--quant" in session.posargs else list(repro.DEFAULT_QUANTS)
    work = WORK / "reproduce"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    code = repro.run(cell, python, MATRIX, work, REPO / "reports" / "REPRODUCE.md", opts.arch, quants, info)
    if code != repro.EXIT_SAME:
        session.error(f"verdicts depend on the CPU kernels or thread count (exit {code}): see reports/REPRODUCE.md")


SWEEP = REPO / "reports" / "sweep"


def _sweep_matrix():
    return MATRIX.with_run(MATRIX.sweep.get("run", {}))


@nox.session(python=PYTHON, default=False)
def sweep(session: nox.Session) -> None:
    """Every release in a range, a small case set each (harness/campaigns/sweep.py) -> reports/SWEEP.md (+ SWEEP.png).
    --shard K/N runs a share of the cells (processes or CI jobs side by side; harness sweep-report merges them)."""
    from harness.campaigns import sweep as sw

    try:
        opts = cli.parse_with(cli.sweep_parser(), session.posargs)
        cells = [] if opts.publisher_only else cli.shard(sw.cells(
            sw.select(opts.transformers, sw.published_releases("transformers"), "transformers", opts.minor),
            sw.select(opts.peft, sw.published_releases("peft"), "peft"), MATRIX.sweep.get("trl", "latest")), opts.shard)
        archs = MATRIX.check_archs(opts.arch or MATRIX.sweep["archs"])
        quants = MATRIX.check_quants(opts.quant or MATRIX.sweep["quants"])
    except MatrixError as exc:
        session.error(str(exc))
    session.install(*REPORT_DEPS)
    publisher = None if opts.no_publisher else MATRIX.sweep_publisher()
    results = Path(opts.results) if opts.results else SWEEP / "results"
    session.log(f"sweep: {len(cells)} cell(s){' after the publisher ' + publisher.name if publisher else ''}; "
                f"{', '.join(archs)} x {', '.join(quants)} -> {results}")
    venvs = Path(session.virtualenv.location).with_name("sweep-venvs")
    sw.run(([publisher] if publisher else []) + cells, _sweep_matrix(), venvs, results, WORK / "sweep",
           archs, quants, log=session.log)
    if not (opts.no_report or opts.publisher_only):
        session.run("python", "-m", "harness", "sweep-report", "--results", str(results),
                    "--out", str(REPO / "reports" / "SWEEP.md"), env={"PYTHONPATH": str(REPO)})


@nox.session(python=PYTHON, default=False)
def serve(session: nox.Session) -> None:
    """The serving cell ([serve] in matrix.toml, harness/campaigns/serve.py): nf4 QLoRA trained with the shims, its merged
    exports and adapters served by vLLM in a venv of its own -> reports/serve/results, reports/SERVE.md."""
    from harness.campaigns import serve as sv

    try:
        opts = cli.parse_with(cli.serve_parser(), session.posargs)
        MATRIX.check_archs(opts.arch or MATRIX.serve["archs"])
        MATRIX.check_quants(opts.quant or MATRIX.serve["quants"])
        if opts.plant and opts.plant not in sv.known_mutations():
            raise MatrixError(f"--plant {opts.plant!r}: no such mutation; known: {', '.join(sv.known_mutations())}")
    except MatrixError as exc:
        session.error(str(exc))
    session.install(*REPORT_DEPS)
    venv = Path(session.virtualenv.location).with_name("serve-cell")
    if opts.plant:  # the planted check: its own results; every case must turn red at the served-export rules
        results = sv.run(MATRIX, venv, WORK / "serve-planted" / "results", WORK / "serve-planted", opts.arch,
                         opts.quant, log=session.log, plant=opts.plant)
        summary = sv.write_planted(results, opts.plant)
        session.log(f"planted {opts.plant}: {'caught' if summary['caught'] else 'NOT caught'} -> {sv.PLANTED}")
        if not summary["caught"]:
            session.error(f"the serving rules did not see {opts.plant}: {summary['cases']}")
        return
    results = sv.run(MATRIX, venv, sv.RESULTS, WORK / "serve", opts.arch, opts.quant, log=session.log)
    session.run("python", "-m", "harness", "serve-report", "--results", str(sv.RESULTS), "--out", str(sv.REPORT),
                env={"PYTHONPATH": str(REPO)})
    red = sv.red_cases(results)  # the report is written first; then a serving case that did not pass fails the run
    if red:
        session.error(f"serving: {len(red)} case(s) did not pass: {red}")


@nox.session(python=PYTHON, default=False)
def bisect(session: nox.Session) -> None:
    """The first release where one case's verdict changes (harness/campaigns/bisect.py); prints every step."""
    from harness.campaigns import bisect as bi

    try:
        opts = cli.parse_with(cli.bisect_parser(), session.posargs)
        result = bi.bisect(opts.case, opts.mode, opts.package, opts.good, opts.bad, bi.default_pins(opts),
                           _sweep_matrix(), Path(session.virtualenv.location).with_name("sweep-venvs"),
                           WORK / "bisect" / "results", WORK / "bisect", log=session.log, check=opts.check)
    except MatrixError as exc:
        session.error(str(exc))
    session.log(result.summary())


@nox.session(python=PYTHON, default=False)
def archs(session: nox.Session) -> None:
    """Every MoE arch of the newest transformers, discovered from the library, shims off and on ->
    reports/ARCHS.md (-- qwen3_moe,jetmoe limits the run to some discovered archs; -- --lane NAME runs on that
    release lane instead, in a venv beside this session's -> reports/ARCHS-NAME.md)."""
    try:
        opts = cli.parse_with(cli.archs_parser(), session.posargs)
        cell = cli.archs_cell(opts.lane, MATRIX)
    except MatrixError as exc:
        session.error(str(exc))
    if cell.name == MATRIX.archs_cell().name:
        python = _install_or_stop(session, cell, "the archs cell")
    else:
        python = _sibling_venv(session, cell, "the archs lane")
    session.install(*REPORT_DEPS)
    only = ",".join(a for arg in opts.only for a in arg.split(",") if a)
    session.run("python", "-m", "harness", "archs", "--python", python, "--only", only, "--lane", opts.lane or "",
                "--work", str(WORK / "archs"), env={"PYTHONPATH": str(REPO)})


@nox.session(python=PYTHON, default=False)
def bench(session: nox.Session) -> None:
    """Side by side: 5.x + shims 4-bit, 5.x bf16, 5.x native "4-bit", 4.57.6 native 4-bit -> reports/BENCH.md.
    Small dims by default (CPU); pass e.g. -- --device cuda --hidden 2048 --experts 128 --top-k 8
    --moe-intermediate 768 --vocab 151936 --layers 4 --batch 2 --seq 512 for the Qwen3-30B-A3B shape."""
    session.install(*REPORT_DEPS)
    location = Path(session.virtualenv.location)
    tf457 = install.ensure_venv(location.with_name(location.name + "-tf457"), PYTHON)
    pythons = {"tf5": _venv_python(session), "tf457": tf457}
    cells = MATRIX.bench_cells()
    for label, python in pythons.items():
        try:
            install.install(python, cells[label], MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
        except install.InstallError as exc:
            session.error(f"bench: cannot install {cells[label].name}: {exc.message}")
    interps = [f"--interp={label}={python}" for label, python in pythons.items()]
    session.run("python", "-m", "harness", "bench", *interps, *session.posargs, env={"PYTHONPATH": str(REPO)})


@nox.session(python=PYTHON, default=False)
def bench_depth(session: nox.Session) -> None:
    """Full-depth QLoRA benchmark at small dims on CPU (the code path of the GPU run; figures are not comparable):
    -> reports/BENCH-depth-cpu.md. The GPU run at full shapes: gpu/run.sh depth."""
    python = _install_or_stop(session, MATRIX.bench_cells()["tf5"], "the bench cell")
    session.install(*REPORT_DEPS)
    session.run("python", "-m", "harness", "bench-depth", "--python", python, "--timeout-s", "900",
                "--out", str(REPO / "reports" / "BENCH-depth-cpu.md"),
                "--json", str(REPO / "reports" / "bench-depth-cpu.json"), *session.posargs,
                env={"PYTHONPATH": str(REPO)})


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


# allow_parallel: each test lane has its own venv; tests write only under pytest's tmp_path.
@nox.session(python=PYTHON, default=False, allow_parallel=True)
@nox.parametrize("cell", _params(MATRIX.test_cells()))
def tests(session: nox.Session, cell: str) -> None:
    """Unit, property and fault-injection tests, in a venv with this test lane's ML pins."""
    cell = TEST_LANES[cell]
    python = _venv_python(session)
    try:
        install.install(python, cell, MATRIX.environment, float(MATRIX.run["install_timeout_s"]))
    except install.InstallError as exc:
        session.error(f"cannot install test lane {cell.name}: {exc.message}")
    session.install("pytest", "hypothesis", *REPORT_DEPS)
    # The harness tests do not depend on the ML versions: run them in the first test lane only.
    paths = [] if cell == MATRIX.test_lanes[0] else ["tests/shims"]
    session.run("python", "-m", "pytest", "-q", *(session.posargs or paths),
                env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MOE_SHIMS_JOBS": "1"})


@nox.session(python=PYTHON, default=False)
def gate(session: nox.Session) -> None:
    """Release gate: reports/results against reports/baseline.json (harness/gate.py: exit 0 pass, 1 fail,
    2 bad input). Standard library only: nothing to install."""
    session.run("python", "-m", "harness", "gate", "--results", str(RESULTS), "--baseline", str(BASELINE))


@nox.session(python=PYTHON, default=False)
def baseline(session: nox.Session) -> None:
    """Accept reports/results as the new reports/baseline.json (review the diff, commit it with the release)."""
    session.run("python", "-m", "harness", "baseline", "--results", str(RESULTS), "--out", str(BASELINE))


@nox.session(python=PYTHON, default=False)
def release(session: nox.Session) -> None:
    """The gate first; only if it passes, sdist + wheel of moe-shims (version: shims.__version__) into dist/."""
    from harness import gate as release_gate

    code = release_gate.run([RESULTS], BASELINE)
    if code != release_gate.EXIT_PASS:
        why = "failed" if code == release_gate.EXIT_FAIL else "could not judge the results (bad input)"
        session.error(f"no release: the gate {why} (exit {code}); see above")
    version = runner.shims_version()
    dist = REPO / "dist"
    session.install("build")
    session.run("python", "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(REPO))
    built = sorted(p.name for p in dist.glob(f"moe_shims-{version}[.-]*"))
    if not any(n.endswith(".whl") for n in built) or not any(n.endswith(".tar.gz") for n in built):
        session.error(f"python -m build did not leave moe_shims-{version} sdist + wheel in {dist}: {built}")
    session.log(f"released moe-shims {version}: {', '.join(built)}")
