"""Results files: one JSON document per (cell, shims mode), schema-versioned, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
KIND = "moe-shims/cell-results"
# Cell-level statuses. "ran": the process ran and every case has a record (a case may itself have failed).
CELL_STATUSES = ("ran", "unresolvable", "install_failed")
# Case metric: the stages that found nothing published yet by the cells they read from (a fresh run's early lanes);
# harness.runner.run_second_pass re-runs exactly those stages after every lane has run.
AWAITS_PUBLISHERS = "awaits_publishers"


def case_id(arch: str, quant: str) -> str:
    """The id of one case (an arch x a quantization) in results files, reports, the gate and the baseline."""
    return f"{arch}/{quant}"


def case_key(record: dict) -> str:
    """The id of a case record (records written before "case" was stored carry only arch and quant)."""
    return record.get("case") or case_id(record.get("arch"), record.get("quant"))


def results_name(cell_name: str, mode: str) -> str:
    return f"{cell_name}__shims-{mode}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Problem:
    """A results file that could not be used, and why."""

    file: str
    problem: str


def validate(doc) -> str | None:
    """Return what is wrong with a results document, or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("kind") != KIND:
        return f"not a moe-shims results file (kind={doc.get('kind')!r})"
    if doc.get("schema") != SCHEMA_VERSION:
        return f"schema {doc.get('schema')!r} is not the supported {SCHEMA_VERSION}"
    for key in ("cell", "mode", "status", "cases"):
        if key not in doc:
            return f"missing field {key!r}"
    if doc["status"] not in CELL_STATUSES:
        return f"unknown cell status {doc['status']!r}"
    if not isinstance(doc["cases"], list):
        return "field 'cases' is not a list"
    return None


def load_dir(folder: Path) -> tuple[list[dict], list[Problem]]:
    """Every valid results document under ``folder`` (recursively), and a Problem for each bad *.json file."""
    docs, problems = [], []
    folder = Path(folder)
    if not folder.is_dir():
        return [], [Problem(str(folder), "results folder does not exist")]
    for path in sorted(folder.rglob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            problems.append(Problem(str(path), f"not UTF-8 text ({exc.reason})"))
            continue
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), f"corrupt or truncated JSON ({exc.msg} at line {exc.lineno})"))
            continue
        reason = validate(doc)
        if reason:
            problems.append(Problem(str(path), reason))
            continue
        doc["_file"] = str(path)
        docs.append(doc)
    return docs, problems
