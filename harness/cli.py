"""Command-line options shared by the nox sessions (after `--`) and `python -m harness`."""

from __future__ import annotations

import argparse

from .matrix import MODES, PACKAGES, Cell, Matrix, MatrixError, check_version


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cell_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s e2e --", add_help=False)
    p.add_argument("--arch", type=_csv, default=None, help="comma-separated archs (default: all)")
    p.add_argument("--quant", type=_csv, default=None, help="comma-separated quantizations (default: all)")
    p.add_argument("--mode", type=_csv, default=list(MODES), help="shims modes: off,on (default: both)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the cases run (default cpu)")
    for package in PACKAGES:
        p.add_argument(f"--{package}", default=None, help=f"{package} version for an ad-hoc cell, or 'latest'")
    return p


def parse_cell_options(argv: list[str], matrix: Matrix) -> argparse.Namespace:
    """Validate everything before anything runs; errors name the bad value and the allowed ones."""
    parser = cell_parser()
    try:
        opts, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse already printed which value was bad
        raise MatrixError(f"invalid command-line options {' '.join(argv)}") from exc
    if unknown:
        allowed = ", ".join(a for action in parser._actions for a in action.option_strings)
        raise MatrixError(f"unknown option(s) {' '.join(unknown)}; allowed: {allowed}")
    opts.arch = matrix.check_archs(opts.arch)
    opts.quant = matrix.check_quants(opts.quant)
    bad_modes = [m for m in opts.mode if m not in MODES]
    if bad_modes:
        raise MatrixError(f"unknown shims mode {', '.join(bad_modes)}; allowed: {', '.join(MODES)}")
    for package in PACKAGES:
        value = getattr(opts, package)
        if value is not None:
            setattr(opts, package, check_version(package, value))
    return opts


def adhoc_cell(opts: argparse.Namespace) -> Cell:
    missing = [f"--{p}" for p in PACKAGES if getattr(opts, p) is None]
    if missing:
        raise MatrixError(f"an ad-hoc cell needs {', '.join(missing)} (a version or 'latest')")
    return Cell(opts.transformers, opts.peft, opts.trl, trl_why="ad-hoc cell from the command line")


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s serve --", add_help=False)
    p.add_argument("--arch", type=_csv, default=None, help="comma-separated archs (default: [serve] archs)")
    p.add_argument("--quant", type=_csv, default=None, help="comma-separated quantizations (default: [serve] quants)")
    p.add_argument("--plant", default=None, help="a mutation of cases/mutations.py to plant (the planted check)")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s sweep --", add_help=False)
    p.add_argument("--transformers", default="5.0.0..latest", help="releases: A..B, a comma list, or both")
    p.add_argument("--peft", default="0.19.1,latest", help="releases: A..B, a comma list, or both")
    p.add_argument("--arch", type=_csv, default=None, help="comma-separated archs (default: [sweep] archs)")
    p.add_argument("--quant", type=_csv, default=None, help="comma-separated quantizations (default: [sweep] quants)")
    p.add_argument("--minor", action="store_true", help="of each major.minor in a range, its newest patch only")
    p.add_argument("--no-publisher", action="store_true", help="skip the 4.57 publisher cell ([sweep] publisher)")
    p.add_argument("--publisher-only", action="store_true", help="run only the publisher (a CI job before the cells)")
    p.add_argument("--shard", default=None, help="K/N: run every N-th cell starting at the K-th (parallel processes)")
    p.add_argument("--results", default=None, help="results folder (default reports/sweep/results)")
    p.add_argument("--no-report", action="store_true", help="do not render SWEEP.md (a shard of a fan-out)")
    return p


def shard(items: list, spec: str | None) -> list:
    """``spec`` "K/N": every N-th item starting at the K-th (1-based); None: all of them."""
    if not spec:
        return items
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError as exc:
        raise MatrixError(f"--shard {spec!r}: use K/N, e.g. 1/2") from exc
    if not 1 <= k <= n:
        raise MatrixError(f"--shard {spec!r}: K must be between 1 and N")
    return items[k - 1::n]


def bisect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s bisect --", add_help=False)
    p.add_argument("--case", required=True, help="ARCH/QUANT, e.g. qwen3_moe/nf4")
    p.add_argument("--mode", required=True, choices=("native", "shims"))
    p.add_argument("--package", required=True, choices=PACKAGES)
    p.add_argument("--good", required=True)
    p.add_argument("--bad", required=True)
    p.add_argument("--check", default=None, help="stage:NAME or rule:NAME to bisect on (default: the case's verdict)")
    for package in PACKAGES:
        p.add_argument(f"--{package}", default=None, dest=package, help=f"{package} for the other cells")
    return p


def parse_with(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``parser``; a bad or unknown option raises MatrixError naming it and the allowed ones."""
    try:
        opts, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:
        raise MatrixError(f"invalid command-line options {' '.join(argv)}") from exc
    if unknown:
        allowed = ", ".join(a for action in parser._actions for a in action.option_strings)
        raise MatrixError(f"unknown option(s) {' '.join(unknown)}; allowed: {allowed}")
    return opts


def archs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nox -s archs --", add_help=False)
    p.add_argument("only", nargs="*", help="comma-separated discovered archs to run (default: all)")
    p.add_argument("--lane", default=None, help="a release lane of harness/matrix.toml by name (default: the [archs] "
                                                "cell, the newest lane); writes reports/ARCHS-<lane>.md")
    return p


def archs_cell(lane: str | None, matrix: Matrix) -> Cell:
    """The cell ``nox -s archs`` runs on: the [archs] cell, or the release lane named ``lane`` (its exact pins)."""
    if not lane:
        return matrix.archs_cell()
    lanes = {c.name: c for c in matrix.lanes}
    if lane not in lanes:
        raise MatrixError(f"--lane {lane!r} is not a release lane; lanes: {', '.join(lanes)}")
    return lanes[lane]
