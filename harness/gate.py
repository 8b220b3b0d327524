"""Release gate: judge current results against the committed baseline of the last release.

    python -m harness gate --results DIR [--results DIR2 ...] [--baseline reports/baseline.json]
    python -m harness baseline --results DIR [--results DIR2 ...] --out reports/baseline.json
    nox -s gate | nox -s baseline | nox -s release

The gate never changes the baseline: accepting new results as the baseline is the separate, explicit
``baseline`` command (write the file, review the diff, commit it with the release).

What fails the gate (each reason is printed on its own line, prefixed by its kind):

    regressed      a case that passed in the baseline does not pass now (failed, error, missing, did not run)
    out of bounds  a verdict rule (harness/verdict.py: the thresholds live there only) that held for a case in
                   the baseline is broken now, with the metric values now and then
    new case       a case with shims on that is not in the baseline does not pass
    lane           a release lane of harness/matrix.toml has no results for a shims mode, or did not run
                   (unresolvable and install_failed count as did not run), or ran no case
    version        a results file was produced by a moe-shims version other than the one being released
                   (shims.__version__, read by harness.runner.shims_version())

Exit codes:

    0  the gate passed; prints what it checked (counts)
    1  the gate failed; prints every reason
    2  bad input, with a message saying which and what to do: the baseline is missing, unreadable, not a
       baseline, or from an older or newer baseline schema; a results folder is missing, empty, or holds no
       moe-shims results files (unrelated files only); two runs of the same cell + mode disagree on a verdict
       (conflicting duplicates: remove one); ``baseline`` given results from several shims versions.

Standard library only (no pandas): it runs in nox's own interpreter.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import verdict
from .matrix import MODES, Matrix, load_matrix
from .reporting.merge import MergedResults, load_many
from .results import case_key, write_text_atomic

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2
BASELINE_KIND = "moe-shims/baseline"
BASELINE_SCHEMA = 1

# The metrics the verdict rules read (each Rule declares its own in harness/verdict.py): the baseline keeps
# these, so the rules can be re-evaluated on it, and the gate prints them when a rule breaks.
KEY_METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for rule in verdict.RULES for m in rule.metrics))
DID_NOT_RUN = ("unresolvable", "install_failed")


class BadInput(Exception):
    """The gate cannot judge: exit 2 with this message."""


# -- inputs --------------------------------------------------------------------------------------------------

def _visible_files(folder: Path) -> list[Path]:
    # dot-files are the temp files of atomic writes in progress
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_results(folders: Iterable[Path]) -> MergedResults:
    """Merged results of every folder; BadInput for a folder that is missing, empty or unrelated, or conflicts."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise BadInput("no results folder given (--results DIR)")
    for folder in folders:
        if not folder.is_dir():
            raise BadInput(f"results folder {folder} does not exist")
        if not _visible_files(folder):
            raise BadInput(f"results folder {folder} is empty: run the lanes first (nox -s e2e)")
    merged = load_many(folders)
    for folder in folders:
        if not any(d["_folder"] == str(folder) for d in merged.docs):
            others = _visible_files(folder)
            why = {p.file: p.problem for p in merged.problems}
            shown = ", ".join(f"{p.name}" + (f" ({why[str(p)]})" if str(p) in why else "") for p in others[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            raise BadInput(f"results folder {folder} holds no moe-shims results files, only "
                           f"{len(others)} unrelated file(s): {shown}{more}")
    if merged.conflicts:
        lines = "\n  ".join(c.describe() for c in merged.conflicts)
        raise BadInput("conflicting duplicate results (same cell and mode, different verdicts); remove the "
                       f"wrong run before gating:\n  {lines}")
    return merged


def load_baseline(path: Path) -> dict:
    path = Path(path)
    accept = f"accept one with `python -m harness baseline --results DIR --out {path}`"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"baseline {path} not found: {accept}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"baseline {path} is not readable JSON ({exc}): restore it from git or {accept}") from None
    if not isinstance(doc, dict) or doc.get("kind") != BASELINE_KIND:
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise BadInput(f"{path} is not a moe-shims baseline (kind={kind!r}); {accept}")
    schema = doc.get("schema")
    if not isinstance(schema, int):
        raise BadInput(f"baseline {path} has no schema version; {accept}")
    if schema < BASELINE_SCHEMA:
        raise BadInput(f"baseline {path} has the older schema {schema} (this harness reads {BASELINE_SCHEMA}): "
                       f"regenerate it from the last release's results; {accept}")
    if schema > BASELINE_SCHEMA:
        raise BadInput(f"baseline {path} has the newer schema {schema} (this harness reads {BASELINE_SCHEMA}): "
                       "update the harness to the version that wrote it")
    if not isinstance(doc.get("cells"), dict):
        raise BadInput(f"baseline {path} has no 'cells' table; {accept}")
    return doc


# -- baseline ------------------------------------------------------------------------------------------------

def _compact_case(case: dict) -> dict:
    metrics = case.get("metrics", {})
    return {
        "verdict": verdict.judge(case)[0], "arch": case.get("arch"), "quant": case.get("quant"),
        "stages": {name: stage.get("status") for name, stage in case.get("stages", {}).items()},
        "metrics": {k: metrics[k] for k in KEY_METRICS if k in metrics},
    }


def expand_case(case_id: str, compact: dict) -> dict:
    """A case record rebuilt from its baseline entry, enough for the verdict rules to be evaluated on it."""
    return {"case": case_id, "arch": compact.get("arch"), "quant": compact.get("quant"),
            "stages": {name: {"status": status} for name, status in compact.get("stages", {}).items()},
            "metrics": dict(compact.get("metrics", {}))}


def make_baseline(docs: list[dict]) -> dict:
    """The compact baseline document of a results set (newest run of each cell + mode)."""
    versions = sorted({d.get("shims_version", "?") for d in docs})
    if len(versions) != 1:
        raise BadInput(f"results come from several moe-shims versions ({', '.join(versions)}): a baseline "
                       "describes one release; rerun the stale cells first")
    cells: dict[str, dict] = {}
    for doc in sorted(docs, key=lambda d: d.get("started") or 0):
        entry = {"status": doc["status"], "started": doc.get("started"),
                 "versions": {p: (doc.get("versions") or {}).get(p) for p in ("transformers", "peft", "trl")},
                 "cases": {case_key(c): _compact_case(c)
                           for c in doc["cases"]}}
        cells.setdefault(doc["cell"]["name"], {})[doc["mode"]] = entry  # newest run wins
    return {"kind": BASELINE_KIND, "schema": BASELINE_SCHEMA, "shims_version": versions[0],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cells": cells}


def dump_baseline(doc: dict) -> str:
    """JSON with one line per case, so a re-baseline reads as a short diff in review."""
    def one(value) -> str:
        return json.dumps(value, sort_keys=True, separators=(", ", ": "))

    head = {k: v for k, v in doc.items() if k != "cells"}
    lines = ["{"] + [f" {json.dumps(k)}: {one(v)}," for k, v in sorted(head.items())] + [' "cells": {']
    cells = sorted(doc["cells"].items())
    for i, (cell, modes) in enumerate(cells):
        lines.append(f"  {json.dumps(cell)}: {{")
        for j, (mode, run) in enumerate(sorted(modes.items())):
            meta = {k: v for k, v in run.items() if k != "cases"}
            lines.append(f"   {json.dumps(mode)}: {one(meta)[:-1]}, \"cases\": {{")
            cases = sorted(run["cases"].items())
            lines += [f"    {json.dumps(c)}: {one(v)}" + ("," if k < len(cases) - 1 else "")
                      for k, (c, v) in enumerate(cases)]
            lines.append("   }}" + ("," if j < len(modes) - 1 else ""))
        lines.append("  }" + ("," if i < len(cells) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


# -- the gate ------------------------------------------------------------------------------------------------

@dataclass
class GateResult:
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def fail(self, line: str) -> None:
        if line not in self.failures:
            self.failures.append(line)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def _case_id(case: dict) -> str:
    return case_key(case)


def _values(case: dict, rule: verdict.Rule) -> str:
    metrics = case.get("metrics", {})
    return ", ".join(f"{k}={metrics.get(k, 'absent')}" for k in rule.metrics)


def _check_version(docs: list[dict], release_version: str, result: GateResult) -> None:
    for doc in docs:
        produced = doc.get("shims_version")
        if produced != release_version:
            result.fail(f"version: {doc['_file']} was produced by moe-shims {produced}, the release is "
                        f"{release_version}: rerun {doc['cell']['name']} shims-{doc['mode']}")
    result.count("results files", len(docs))


def _check_lanes(docs: list[dict], matrix: Matrix, result: GateResult) -> None:
    for lane in matrix.lanes:
        for mode in MODES:
            runs = [d for d in docs if d["cell"]["name"] == lane.name and d["mode"] == mode]
            result.count("lane runs checked")
            where = f"lane: {lane.name} shims-{mode}"
            if not runs:
                result.fail(f"{where}: no results file (the lane did not run)")
            elif not any(d["status"] == "ran" for d in runs):
                d = runs[0]
                last = ((d.get("error") or {}).get("message") or "").strip().splitlines()[-1:] or [""]
                result.fail(f"{where}: did not run ({d['status']}): {last[0][:300]}")
            elif not any(d["cases"] for d in runs if d["status"] == "ran"):
                result.fail(f"{where}: ran no case")


def _check_case(where: str, case: dict, base: dict | None, mode: str, result: GateResult) -> None:
    now, reasons = verdict.judge(case)
    why = f": {'; '.join(reasons)[:400]}" if reasons else ""
    if base is None:
        result.count("new cases (not in baseline)")
        if mode == "on" and now not in (verdict.PASS, verdict.NA):
            result.fail(f"new case: {where} is not in the baseline and is {now} with shims on{why}")
        return
    result.count("cases compared with baseline")
    if base["verdict"] == verdict.PASS and now != verdict.PASS:
        result.fail(f"regressed: {where}: pass -> {now}{why}")
    then = expand_case(_case_id(case), base)
    for rule in verdict.RULES:
        if not (rule.applies(then) and rule.holds(then)):
            continue
        result.count("rules compared with baseline")
        if rule.applies(case) and not rule.holds(case):
            result.fail(f"out of bounds: {where}: rule {rule.name} ({rule.description}) broke: now "
                        f"{_values(case, rule)}; baseline {_values(then, rule)}")


def _check_cases(docs: list[dict], baseline: dict, lanes: set[str], result: GateResult) -> None:
    cells = baseline["cells"]
    for doc in docs:
        cell, mode = doc["cell"]["name"], doc["mode"]
        base_run = cells.get(cell, {}).get(mode)
        base_cases = (base_run or {}).get("cases", {})
        if doc["status"] != "ran":
            passed_before = [c for c, b in base_cases.items() if b["verdict"] == verdict.PASS]
            for case_id in passed_before:
                result.fail(f"regressed: {cell} shims-{mode} {case_id}: pass -> did not run ({doc['status']})")
            continue
        seen = set()
        for case in doc["cases"]:
            case_id = _case_id(case)
            seen.add(case_id)
            _check_case(f"{cell} shims-{mode} {case_id}", case, base_cases.get(case_id), mode, result)
        for case_id, base in base_cases.items():
            if case_id not in seen and base["verdict"] == verdict.PASS:
                result.fail(f"regressed: {cell} shims-{mode} {case_id}: pass -> missing (no record in "
                            f"{doc['_file']})")
    present = {(d["cell"]["name"], d["mode"]) for d in docs}
    for cell, modes in cells.items():
        for mode in modes:
            if (cell, mode) not in present and cell not in lanes:  # a missing lane is a failure, above
                result.notes.append(f"baseline run {cell} shims-{mode} (not a release lane) has no current results")


def check(docs: list[dict], baseline: dict, matrix: Matrix, release_version: str) -> GateResult:
    """Every gate rule over a merged, conflict-free results set."""
    result = GateResult()
    _check_version(docs, release_version, result)
    _check_lanes(docs, matrix, result)
    _check_cases(docs, baseline, {lane.name for lane in matrix.lanes}, result)
    return result


# -- command line --------------------------------------------------------------------------------------------

def run(results: list[Path], baseline_path: Path, release_version: str | None = None,
        matrix: Matrix | None = None, out=None) -> int:
    """The `gate` command: print the verdict and return the exit code."""
    out = out or sys.stdout
    from .runner import shims_version

    release_version = release_version or shims_version()
    try:
        baseline = load_baseline(baseline_path)
        merged = load_results(results)
    except BadInput as exc:
        print(f"gate: bad input: {exc}", file=out)
        return EXIT_BAD_INPUT
    result = check(merged.docs, baseline, matrix or load_matrix(), release_version)
    for problem in merged.problems:
        print(f"gate: note: unusable results file {problem.file}: {problem.problem}", file=out)
    for note in result.notes:
        print(f"gate: note: {note}", file=out)
    counts = ", ".join(f"{n} {what}" for what, n in result.counts.items())
    if result.failures:
        print(f"gate: FAILED ({len(result.failures)} reason(s)) for moe-shims {release_version} against "
              f"baseline {baseline_path} (moe-shims {baseline.get('shims_version')}):", file=out)
        for line in result.failures:
            print(f"  {line}", file=out)
        print(f"gate: checked {counts}", file=out)
        return EXIT_FAIL
    print(f"gate: passed for moe-shims {release_version} against baseline {baseline_path} "
          f"(moe-shims {baseline.get('shims_version')}): checked {counts}", file=out)
    return EXIT_PASS


def accept(results: list[Path], out_path: Path, out=None) -> int:
    """The `baseline` command: write the baseline of a results set; exit 0, or 2 on bad input."""
    out = out or sys.stdout
    try:
        merged = load_results(results)
        doc = make_baseline(merged.docs)
    except BadInput as exc:
        print(f"baseline: bad input: {exc}", file=out)
        return EXIT_BAD_INPUT
    write_text_atomic(Path(out_path), dump_baseline(doc))
    n_cases = sum(len(run["cases"]) for modes in doc["cells"].values() for run in modes.values())
    print(f"baseline: wrote {out_path}: moe-shims {doc['shims_version']}, {len(doc['cells'])} cells, "
          f"{n_cases} cases; review and commit it", file=out)
    return EXIT_PASS
