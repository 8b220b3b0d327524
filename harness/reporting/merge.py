"""Results from many machines: load any number of results folders as one set.

Each folder may come from a different machine (a CI job per cell, a GPU box, a laptop). Loading them together:

- an *identical duplicate* (same cell, shims mode, machine and start time: the same run copied twice, e.g. an
  artifact downloaded into two folders) is kept once;
- two runs of the same cell + mode on different machines (or at different times) are both kept, each labelled
  with its machine and device;
- if those runs disagree on a verdict, the pair is a *conflict*: the report lists it in its own section and
  the gate refuses to judge the set (exit 2) until one of them is removed.

Standard library only: the gate uses this in nox's own interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .. import verdict
from ..results import Problem, case_key, load_dir


def run_key(doc: dict) -> tuple:
    """What makes two results documents the same run: cell, mode, machine, start time."""
    return (doc["cell"]["name"], doc["mode"], (doc.get("machine") or {}).get("host", ""), doc.get("started"))


def verdicts_of(doc: dict) -> dict[str, str]:
    """case id -> verdict for a results document; a cell that did not run is one entry, its status."""
    if doc["status"] != "ran":
        return {"(all)": doc["status"]}
    return {case_key(case): verdict.judge(case)[0]
            for case in doc["cases"]}


def label(doc: dict) -> str:
    """machine (device) of a run, for report rows and messages."""
    host = (doc.get("machine") or {}).get("host", "?")
    env = doc.get("environment") or {}
    device = env.get("device_name") or env.get("device") or ""
    return f"{host} ({device})" if device else host


@dataclass(frozen=True)
class Conflict:
    """Runs of one cell + mode whose verdicts differ; ``cases`` maps case id -> {run label: verdict}."""

    cell: str
    mode: str
    files: tuple[str, ...]
    cases: dict[str, dict[str, str]]

    def describe(self) -> str:
        parts = [f"{case}: " + ", ".join(f"{who} -> {v}" for who, v in by_run.items())
                 for case, by_run in sorted(self.cases.items())]
        return f"{self.cell} shims-{self.mode}: " + "; ".join(parts)


@dataclass
class MergedResults:
    folders: list[Path]
    docs: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (file dropped, identical file kept)
    conflicts: list[Conflict] = field(default_factory=list)


def load_many(folders: Iterable[Path]) -> MergedResults:
    """Every valid results document under each folder, identical duplicates dropped, conflicts found."""
    merged = MergedResults([Path(f) for f in folders])
    seen: dict[tuple, dict] = {}
    for folder in merged.folders:
        docs, problems = load_dir(folder)
        merged.problems += problems
        for doc in docs:
            doc["_folder"] = str(folder)
            key = run_key(doc)
            if key in seen:
                merged.duplicates.append((doc["_file"], seen[key]["_file"]))
                continue
            seen[key] = doc
            merged.docs.append(doc)
    merged.conflicts = find_conflicts(merged.docs)
    return merged


def find_conflicts(docs: list[dict]) -> list[Conflict]:
    by_cell_mode: dict[tuple[str, str], list[dict]] = {}
    for doc in docs:
        by_cell_mode.setdefault((doc["cell"]["name"], doc["mode"]), []).append(doc)
    conflicts = []
    for (cell, mode), group in sorted(by_cell_mode.items()):
        if len(group) < 2:
            continue
        per_run = [(f"{label(d)} [{d['_file']}]", verdicts_of(d)) for d in group]
        cases = sorted({case for _, v in per_run for case in v})
        differing = {}
        for case in cases:
            by_run = {who: v.get(case, "missing") for who, v in per_run}
            if len(set(by_run.values())) > 1:
                differing[case] = by_run
        if differing:
            conflicts.append(Conflict(cell, mode, tuple(d["_file"] for d in group), differing))
    return conflicts
