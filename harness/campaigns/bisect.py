"""Find the first release where one case's verdict changes, in O(log n) cells.

    nox -s bisect -- --case qwen3_moe/nf4 --mode native --package transformers --good 5.0.0 --bad 5.25.0
                     [--peft latest] [--trl latest]

The releases of ``--package`` from good to bad (PyPI, final releases) are searched by halving: the good and bad ends
run first (their verdicts must differ, else there is nothing to find), then the middle of the remaining span, each
step a cell with its own uv venv (harness/campaigns/sweep.py installs them) running that one case in that one mode. Each step
prints the release, the verdict and the first failing stage or rule; the answer names the first release with the
bad end's verdict and what changed between it and the release before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..matrix import LATEST, Cell, Matrix, MatrixError
from .sweep import case_verdict, parse_check, published_releases, select

MODES = {"native": "off", "shims": "on", "off": "off", "on": "on"}


@dataclass
class Step:
    release: str
    verdict: str
    cause: str


@dataclass
class Bisection:
    case: str
    mode: str
    package: str
    steps: list[Step] = field(default_factory=list)
    first_bad: Step | None = None
    last_good: Step | None = None

    def summary(self) -> str:
        if self.first_bad is None:
            ends = ", ".join(f"{s.release}: {s.verdict}" for s in self.steps[:2])
            return f"{self.case} ({self.mode}): the ends agree ({ends}): no change to find"
        return (f"{self.case} ({self.mode}): first {self.package} release with verdict {self.first_bad.verdict}: "
                f"{self.first_bad.release} ({self.first_bad.cause or 'no failing stage or rule'}); "
                f"{self.last_good.release} before it: {self.last_good.verdict}"
                f"{' (' + self.last_good.cause + ')' if self.last_good.cause else ''} [{len(self.steps)} cells]")


def _cell(package: str, release: str, pins: dict[str, str]) -> Cell:
    versions = {**pins, package: release}
    return Cell(versions["transformers"], versions["peft"], versions["trl"], trl_why="bisect")


def bisect(case: str, mode: str, package: str, good: str, bad: str, pins: dict[str, str], matrix: Matrix,
           venvs: Path, results: Path, work: Path, log=print, releases: list[str] | None = None,
           check: str | None = None) -> Bisection:
    """``pins``: the versions of the other packages (transformers, peft, trl); ``releases``: the candidate
    releases oldest first (default: PyPI's); ``check``: bisect on one stage's status or one rule's outcome
    ("stage:adapter_reload", "rule:experts_4bit") instead of the case's verdict (natively most cases fail somewhere
    on every release, so a shim's symptom is found through its own check)."""
    if mode not in MODES:
        raise MatrixError(f"--mode {mode!r}: use native or shims")
    arch, _, quant = case.partition("/")
    matrix.check_archs([arch])
    matrix.check_quants([quant])
    span = select(f"{good}..{bad}", releases or published_releases(package), package)
    if len(span) < 2:
        raise MatrixError(f"{package} {good}..{bad} holds {len(span)} release(s): nothing to bisect")
    if check is not None:
        parse_check(check)  # a malformed --check fails before any cell runs
    out = Bisection(case if check is None else f"{case} {check}", mode, package)

    def probe(index: int) -> Step:
        release = span[index]
        step = Step(release, *_run_one(_cell(package, release, pins), case, MODES[mode], matrix, venvs, results,
                                       work, arch, quant, check))
        out.steps.append(step)
        log(f"bisect step {len(out.steps)}: {package} {release}: {step.verdict}"
            f"{' - ' + step.cause if step.cause else ''}")
        return step

    lo, hi = 0, len(span) - 1
    low, high = probe(lo), probe(hi)
    if low.verdict == high.verdict:
        return out
    while hi - lo > 1:
        mid = (lo + hi) // 2
        step = probe(mid)
        if step.verdict == low.verdict:
            lo, low = mid, step
        else:
            hi, high = mid, step
    out.first_bad, out.last_good = high, low
    return out


def _run_one(cell: Cell, case: str, mode: str, matrix: Matrix, venvs: Path, results: Path, work: Path, arch: str,
             quant: str, check: str | None = None) -> tuple[str, str]:
    from .. import install, runner

    python = install.ensure_venv(venvs / cell.name.replace(".", "-"), matrix.environment["python"])
    try:
        info = install.install(python, cell, matrix.environment, float(matrix.run["install_timeout_s"]))
    except install.InstallError as exc:
        return exc.status, exc.message.splitlines()[-1][:200] if exc.message else ""
    path = runner.run_cell(cell, mode, python, matrix, results, work, [arch], [quant], info)
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return case_verdict(doc, case, check)


def default_pins(args) -> dict[str, str]:
    return {"transformers": args.transformers or LATEST, "peft": args.peft or LATEST, "trl": args.trl or LATEST}
