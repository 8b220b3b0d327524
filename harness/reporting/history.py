"""reports/history.jsonl: one compact line per distinct results state, and what changed between states.

Each `python -m harness report` builds a record (timestamp, report title, shims version(s), one verdict per
cell + mode + case) and appends it only when the verdicts or the shims version differ from the last record of
the same report, so the file is a log of changes, not of invocations. A line is appended with a single
``write`` on an O_APPEND descriptor, so concurrent reports cannot interleave inside a line.

The report's "changes since the previous run" compares the current state with the previous distinct one.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..verdict import PASS

log = logging.getLogger("harness")
KIND = "moe-shims/history"


def key(cell: str, mode: str, case: str) -> str:
    return f"{cell} | {mode} | {case}"


def make_record(verdicts: dict[str, str], shims_versions: list[str], title: str,
                versions: dict[str, dict[str, str]] | None = None, code: list[str] | None = None) -> dict:
    """``versions``: cell name -> the package versions its venv had; ``code``: the code digests of the results files
    (harness/runner.py code_digest). Both are what a verdict change is attributed to."""
    return {"kind": KIND, "t": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "report": title,
            "shims_version": ", ".join(sorted(set(shims_versions))), "verdicts": dict(sorted(verdicts.items())),
            "versions": {c: dict(sorted(v.items())) for c, v in sorted((versions or {}).items())},
            "code": ", ".join(sorted(set(code or [])))}


def read(path: Path) -> list[dict]:
    """The records of a history file, oldest first; malformed lines (a crash mid-write) are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a malformed history line", path, n)
            continue
        if isinstance(record, dict) and record.get("kind") == KIND and isinstance(record.get("verdicts"), dict):
            records.append(record)
    return records


def _same_state(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("verdicts", "shims_version", "versions", "code"))


def append_line(path: Path, record: dict) -> None:
    """One write call on an O_APPEND descriptor: the line lands whole, after whatever is there."""
    data = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a previous writer died mid-line: start ours on a line of its own
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
    finally:
        os.close(fd)


def update(path: Path, record: dict) -> tuple[bool, dict | None]:
    """Append ``record`` if the state changed; return (appended, the previous distinct state or None)."""
    same_report = [r for r in read(path) if r.get("report") == record["report"]]
    if same_report and _same_state(same_report[-1], record):
        return False, (same_report[-2] if len(same_report) > 1 else None)
    append_line(path, record)
    return True, (same_report[-1] if same_report else None)


@dataclass
class Changes:
    previous_t: str | None = None
    newly_red: list[tuple[str, str, str]] = field(default_factory=list)    # (key, before, now)
    newly_green: list[tuple[str, str, str]] = field(default_factory=list)
    other: list[tuple[str, str, str]] = field(default_factory=list)        # e.g. fail -> error, n/a -> pass
    appeared: list[str] = field(default_factory=list)
    disappeared: list[str] = field(default_factory=list)
    moved: dict[str, dict[str, tuple]] = field(default_factory=dict)  # cell -> package -> (before, now)
    code: tuple[str, str] | None = None                                # (before, now) digests when the code changed
    known: bool = True        # the previous record has versions and a code digest to compare with

    @property
    def any(self) -> bool:
        return bool(self.newly_red or self.newly_green or self.other or self.appeared or self.disappeared
                    or self.moved or self.code)

    def cause(self, key_: str) -> str:
        """Why one row's verdict changed: the versions its cell moved, the code, both, or neither (then the verdict is
        not reproducible: same code, same packages, another result)."""
        if not self.known:
            return "cause unknown: the previous run recorded no versions / code digest"
        cell = key_.split(" | ", 1)[0]
        reasons = [f"{pkg} {a} -> {b}" for pkg, (a, b) in sorted(self.moved.get(cell, {}).items())]
        if self.code:
            reasons.append(f"code {self.code[0]} -> {self.code[1]}")
        return "; ".join(reasons) if reasons else "NOT REPRODUCIBLE: same versions and code, another verdict"


def _is_red(value: str) -> bool:
    return value not in (PASS, "n/a")


def _installed(version):
    """A recorded version, or None where the package was not installed: a package a run did not record and one it
    recorded as absent ("None", as results files write it) are the same state, not a version move."""
    return None if version in (None, "None") else version


def diff(previous: dict | None, current: dict) -> Changes | None:
    """newly red: was pass, now a failure of any kind; newly green: was a failure, now pass."""
    if previous is None:
        return None
    before, now = previous["verdicts"], current["verdicts"]
    changes = Changes(previous_t=previous.get("t"), known="versions" in previous and "code" in previous)
    if changes.known:
        old_versions, new_versions = previous.get("versions") or {}, current.get("versions") or {}
        for cell in sorted(set(old_versions) & set(new_versions)):
            a, b = old_versions[cell], new_versions[cell]
            moved = {pkg: (a.get(pkg), b.get(pkg)) for pkg in sorted(set(a) | set(b))
                     if _installed(a.get(pkg)) != _installed(b.get(pkg))}
            if moved:
                changes.moved[cell] = moved
        if previous.get("code") != current.get("code"):
            changes.code = (previous.get("code") or "?", current.get("code") or "?")
    for k in sorted(set(before) | set(now)):
        if k not in before:
            changes.appeared.append(k)
        elif k not in now:
            changes.disappeared.append(k)
        elif before[k] != now[k]:
            entry = (k, before[k], now[k])
            if before[k] == PASS and _is_red(now[k]):
                changes.newly_red.append(entry)
            elif _is_red(before[k]) and now[k] == PASS:
                changes.newly_green.append(entry)
            else:
                changes.other.append(entry)
    return changes


def render(changes: Changes | None) -> str:
    if changes is None:
        return "No previous run recorded in the history."
    if not changes.any:
        return f"No change since the previous run ({changes.previous_t})."
    lines = [f"Compared with the previous distinct run ({changes.previous_t}):", ""]
    if changes.known:
        lines.append(f"**Code**: {'changed ' + ' -> '.join(changes.code) if changes.code else 'unchanged'} "
                     "(digest of shims/, cases/, harness/verdict.py, harness/matrix.toml)")
        lines.append("")
        if changes.moved:
            lines.append(f"**Versions moved** ({len(changes.moved)} cell(s)):")
            lines += [f"- {cell}: " + ", ".join(f"{pkg} {a} -> {b}" for pkg, (a, b) in moved.items())
                      for cell, moved in changes.moved.items()]
        else:
            lines.append("**Versions moved**: none (every cell installed what it installed before)")
        lines.append("")
    if not (changes.newly_red or changes.newly_green or changes.other):
        lines += ["**Verdicts**: none changed", ""]
    for title, entries in (("Newly red", changes.newly_red), ("Newly green", changes.newly_green),
                           ("Other verdict changes", changes.other)):
        if entries:
            lines.append(f"**{title}** ({len(entries)}):")
            lines += [f"- {k}: {a} -> {b} ({changes.cause(k)})" for k, a, b in entries]
            lines.append("")
    for title, keys in (("New rows", changes.appeared), ("Rows gone", changes.disappeared)):
        if keys:
            shown = ", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")
            lines += [f"**{title}** ({len(keys)}): {shown}", ""]
    return "\n".join(lines).rstrip()
