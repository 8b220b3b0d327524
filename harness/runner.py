"""Run one (cell, shims mode) in a cell's interpreter, survive what the cases do, and write its results file.

The cases run in one child process (imports cost ~15 s). The child streams events (see cases/run_cell.py);
this supervisor watches them. A case that runs past the timeout is stopped ("timeout"); a child that dies
(signal, crash) leaves its current case "killed"/"crashed" at the stage it was in. Either way the remaining
cases run in a fresh child, so one bad case never costs the rest of the cell.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import time
from pathlib import Path

from .matrix import Cell, Matrix
from .results import AWAITS_PUBLISHERS, KIND, SCHEMA_VERSION, case_id, case_key, results_name, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.5


def shims_version(repo: Path = REPO) -> str:
    """shims.__version__ read without importing the package (the harness has no torch)."""
    tree = ast.parse((repo / "shims" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError("shims/__init__.py defines no __version__")


# The code a verdict depends on: the shims, the cases that exercise them and the rules that judge them. Its digest goes
# into every results file, so the report can tell a verdict that moved with the code from one that moved with a version.
VERDICT_CODE = ("shims", "cases", "harness/verdict.py", "harness/matrix.toml")


def code_digest(repo: Path = REPO) -> str:
    """sha256 (first 12 hex digits) over the paths and bytes of every .py / .toml file of VERDICT_CODE."""
    digest = hashlib.sha256()
    for entry in VERDICT_CODE:
        root = repo / entry
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".py", ".toml"))
        for path in files:
            digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def child_env() -> dict:
    """The environment of a process that runs cases/ in a cell's venv: this repo first on its path."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")


def machine_label() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}


def _read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with open(path, encoding="utf-8") as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete, _, _partial = chunk.rpartition("\n")
    events = []
    for line in complete.splitlines():
        if line.strip():
            events.append(json.loads(line))
    return events, offset + len(complete) + (1 if complete else 0)


class CellRun:
    """Supervises the child processes of one (cell, mode) until every case has a record."""

    def __init__(self, python: str, specs: list[dict], work: Path, case_timeout_s: float, log_path: Path,
                 only_stages: list[str] | None = None):
        self.python = python
        self.only_stages = only_stages  # the second pass: just these stages (and what they need)
        self.pending = [s for s in specs]
        self.work = work
        self.case_timeout_s = case_timeout_s
        self.log_path = log_path
        self.records: dict[str, dict] = {}
        self.versions: dict | None = None
        self.environment: dict = {}
        self.apply_error: dict | None = None
        self.children = 0
        self.total = len(specs)
        self.started = time.monotonic()

    def run(self) -> None:
        while self.pending:
            self._run_child()

    def _case_id(self, spec: dict) -> str:
        return case_id(spec["arch"], spec["quant"])

    def _run_child(self) -> None:
        self.children += 1
        spec_path = self.work / f"spec-{self.children}.json"
        events_path = self.work / f"events-{self.children}.jsonl"
        spec_path.write_text(json.dumps({"shims_on": self.pending[0]["shims_on"], "cases": self.pending,
                                         "only_stages": self.only_stages}))
        events_path.unlink(missing_ok=True)
        env = child_env()
        with open(self.log_path, "a", encoding="utf-8") as log:
            child = subprocess.Popen(
                [self.python, "-m", "cases.run_cell", "--spec", str(spec_path), "--events", str(events_path)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            outcome = self._watch(child, events_path)
        self._settle(outcome, child.returncode)

    def _watch(self, child: subprocess.Popen, events_path: Path) -> dict:
        offset = 0
        current = {"case": None, "stage": None, "since": time.monotonic()}
        while True:
            events, offset = _read_events(events_path, offset)
            for ev in events:
                self._on_event(ev, current)
            if child.poll() is not None:
                events, offset = _read_events(events_path, offset)
                for ev in events:
                    self._on_event(ev, current)
                return {"reason": None, **current}
            if current["case"] and time.monotonic() - current["since"] > self.case_timeout_s:
                _kill_group(child)
                return {"reason": "timeout", **current}
            time.sleep(POLL_S)

    def _on_event(self, ev: dict, current: dict) -> None:
        kind = ev.get("event")
        if kind == "process_start":
            self.versions = ev.get("versions")
        elif kind == "environment":
            self.environment = {k: v for k, v in ev.items() if k not in ("event", "t")}
        elif kind == "shims_apply_failed":
            self.apply_error = ev.get("error")
        elif kind == "case_start":
            current.update(case=ev["case"], stage=None, since=time.monotonic())
        elif kind == "stage_start":
            current["stage"] = ev["stage"]
        elif kind == "case_end":
            self.records[ev["case"]] = ev["record"]
            self.pending = [s for s in self.pending if self._case_id(s) != ev["case"]]
            current.update(case=None, stage=None)
            self._progress(ev["case"], ev["record"])

    def _progress(self, case: str, record: dict) -> None:
        """One line per finished case (long runs are otherwise silent for minutes): verdict, elapsed, estimate."""
        from .verdict import judge

        done, elapsed = len(self.records), time.monotonic() - self.started
        left = elapsed / max(done, 1) * (self.total - done)
        print(f"  [{self.work.parent.name} {self.work.name}] {done}/{self.total} {case}: {judge(record)[0]} "
              f"({elapsed / 60:.1f} min, about {left / 60:.1f} min left)", flush=True)

    def _settle(self, outcome: dict, returncode: int | None) -> None:
        """After a child ends, give the case it was in (if any) a record; drop nothing."""
        if self.apply_error is not None:
            for spec in self.pending:
                self.records[self._case_id(spec)] = _failed_record(spec, "shims.apply", "failed", self.apply_error)
            self.pending = []
            return
        case = outcome["case"]
        if case is None and self.pending and returncode is not None:
            # died before starting a case (import error, crash at start-up): blame the next case
            case, outcome["stage"] = self._case_id(self.pending[0]), "startup"
        if case is None:
            return
        spec = next(s for s in self.pending if self._case_id(s) == case)
        if outcome["reason"] == "timeout":
            status, message = "timeout", f"case exceeded its {self.case_timeout_s:.0f} s limit"
        elif returncode is not None and returncode < 0:
            status, message = "killed", f"process killed by {signal.Signals(-returncode).name}"
        else:
            status, message = "crashed", f"process exited with code {returncode}"
        error = {"type": status, "message": f"{message} during stage {outcome['stage'] or 'startup'}",
                 "traceback": _log_tail(self.log_path)}
        self.records[case] = _failed_record(spec, outcome["stage"] or "startup", status, error)
        self.pending = [s for s in self.pending if self._case_id(s) != case]


def _failed_record(spec: dict, stage: str, status: str, error: dict) -> dict:
    return {"case": case_id(spec["arch"], spec["quant"]), "arch": spec["arch"], "quant": spec["quant"],
            "stages": {stage: {"status": status, "error": error}}, "metrics": {}}


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _log_tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def run_cell(cell: Cell, mode: str, python: str, matrix: Matrix, results_dir: Path, work_root: Path,
             archs=None, quants=None, install: dict | None = None, second_pass: bool = False) -> Path:
    """Run every case of ``cell`` in ``mode`` ("off"/"on") with ``python``; write and return its results file.
    ``second_pass``: register the cases whose stages await other cells' publications for run_second_pass."""
    work = work_root / cell.name / f"shims-{mode}"
    work.mkdir(parents=True, exist_ok=True)
    specs = matrix.case_specs(mode == "on", archs, quants, cache_dir=str(work_root / "models"),
                              work_dir=str(work / "cases"), store_dir=str(work_root / "adapters"))
    started = time.time()
    supervisor = CellRun(python, specs, work, float(matrix.run["case_timeout_s"]), work / "cell.log")
    supervisor.run()
    order = [case_id(s["arch"], s["quant"]) for s in specs]
    doc = _document(cell, mode, "ran", started, install)
    doc.update(
        versions=supervisor.versions or {},
        environment=supervisor.environment,
        cases=[supervisor.records[c] for c in order],
        processes=supervisor.children,
    )
    path = results_dir / results_name(cell.name, mode)
    write_json_atomic(path, doc)
    if second_pass:
        register_second_pass(work_root, path, python, specs, work, float(matrix.run["case_timeout_s"]))
    return path


# -- the second pass --------------------------------------------------------------------------------------------------
# Some stages read what other cells publish to the store (work_root/adapters): a 4.57 lane's per_expert_adapters
# loads the fused adapters that 5.x lanes train. In a fresh run the 4.57 lanes go first (the 5.x lanes load the 4.x
# pre-quantized checkpoints they publish), so those stages find nothing and record so (metric awaits_publishers).
# Each run registers such cases under work_root/second-pass; run_second_pass, after every lane, re-runs just those
# stages in the cell's own interpreter and puts their records into the cell's results file.
SECOND_PASS_DIR = "second-pass"


def _registration(work_root: Path, results: Path) -> Path:
    digest = hashlib.sha1(str(Path(results).resolve()).encode()).hexdigest()[:10]
    return Path(work_root) / SECOND_PASS_DIR / f"{digest}__{Path(results).name}"


def _awaiting(record: dict) -> list[str]:
    return list(record.get("metrics", {}).get(AWAITS_PUBLISHERS) or [])


def register_second_pass(work_root: Path, results: Path, python: str, specs: list[dict], work: Path,
                         case_timeout_s: float) -> Path | None:
    """Record the cases of ``results`` whose stages await publications (None, and any older registration of the same
    results file removed, when there are none)."""
    doc = json.loads(Path(results).read_text())
    waiting = {case_key(c) for c in doc.get("cases", []) if _awaiting(c)}
    target = _registration(work_root, results)
    if not waiting:
        target.unlink(missing_ok=True)
        return None
    write_json_atomic(target, {"results": str(results), "python": python, "work": str(work),
                               "case_timeout_s": case_timeout_s,
                               "specs": [s for s in specs if case_id(s["arch"], s["quant"]) in waiting]})
    return target


def run_second_pass(work_root: Path) -> list[dict]:
    """Run every registered second pass (results files side by side when there are CPUs for it); each registration is
    removed once its results file holds the new records. Returns one summary per results file."""
    from concurrent.futures import ThreadPoolExecutor

    folder = Path(work_root) / SECOND_PASS_DIR
    registrations = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not registrations:
        return []
    with ThreadPoolExecutor(max_workers=min(len(registrations), parallel_jobs())) as pool:
        return [f.result() for f in [pool.submit(_second_pass_one, r) for r in registrations]]


def _second_pass_one(registration: Path) -> dict:
    reg = json.loads(registration.read_text())
    results = Path(reg["results"])
    try:
        doc = json.loads(results.read_text())
    except FileNotFoundError:  # the results were removed since: nothing to complete
        registration.unlink(missing_ok=True)
        return {"results": str(results), "cases": [], "stages": [], "started": time.time(), "seconds": 0.0,
                "note": "results file gone"}
    records = {case_key(c): c for c in doc["cases"]}
    # the results file decides what still waits (a newer first pass may have run the stage since)
    groups: dict[tuple[str, ...], list[dict]] = {}
    for spec in reg["specs"]:
        stages = tuple(_awaiting(records.get(case_id(spec["arch"], spec["quant"]), {})))
        if stages:
            groups.setdefault(stages, []).append(spec)
    started = time.time()
    work = Path(reg["work"]) / SECOND_PASS_DIR
    work.mkdir(parents=True, exist_ok=True)
    rerun = []
    for stages, specs in groups.items():
        supervisor = CellRun(reg["python"], specs, work, float(reg["case_timeout_s"]), work / "cell.log",
                             only_stages=list(stages))
        supervisor.run()
        for cid, new in supervisor.records.items():
            records[cid] = merge_rerun(records[cid], new, list(stages))
            rerun.append(cid)
    summary = {"results": str(results), "cases": rerun, "stages": sorted({s for g in groups for s in g}),
               "started": started, "seconds": round(time.time() - started, 1)}
    if rerun:
        doc["cases"] = [records[case_key(c)] for c in doc["cases"]]
        doc.setdefault("second_pass", []).append({k: v for k, v in summary.items() if k != "results"})
        write_json_atomic(results, doc)
    registration.unlink(missing_ok=True)
    return summary


def merge_rerun(record: dict, new: dict, stages: list[str]) -> dict:
    """``record`` with the second pass's records of ``stages`` and the metrics they recorded. A stage the second pass
    needed that did not succeed (its build, say) is copied too, so a skip in the merged record has its cause."""
    merged = {**record, "stages": dict(record.get("stages", {})), "metrics": dict(record.get("metrics", {}))}
    for name, stage in new.get("stages", {}).items():
        if name in stages or stage.get("status") not in ("ok", "skipped"):
            merged["stages"][name] = stage
    rerun = new.get("rerun") or {}
    still = [s for s in _awaiting(record) if s not in stages]
    metrics = dict(rerun.get("metrics", {}))
    still += [s for s in metrics.pop(AWAITS_PUBLISHERS, []) if s not in still]
    merged["metrics"].update(metrics)
    if still:
        merged["metrics"][AWAITS_PUBLISHERS] = still
    else:
        merged["metrics"].pop(AWAITS_PUBLISHERS, None)
    return merged


def interpreter_cell(python: str) -> Cell:
    """The cell an existing interpreter represents: the transformers / peft / trl it has installed."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('transformers', 'peft', 'trl')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    versions = json.loads(out.strip().splitlines()[-1])
    return Cell(versions["transformers"], versions["peft"], versions["trl"], trl_why="installed in the interpreter")


def parallel_jobs() -> int:
    """Child processes run at once: MOE_SHIMS_JOBS, else one per CPU (each child uses one torch thread)."""
    return max(1, int(os.environ.get("MOE_SHIMS_JOBS") or os.cpu_count() or 1))


def run_modes(cell: Cell, modes, python: str, matrix: Matrix, results_dir: Path, work_root: Path,
              archs=None, quants=None, install: dict | None = None) -> list[Path]:
    """run_cell for each shims mode, side by side when there are CPUs for it; cases awaiting other cells'
    publications are registered for run_second_pass."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(modes), parallel_jobs())) as pool:
        futures = [pool.submit(run_cell, cell, mode, python, matrix, results_dir, work_root, archs, quants, install,
                               True) for mode in modes]
        return [f.result() for f in futures]


def write_install_failure(cell: Cell, status: str, message: str, results_dir: Path,
                          install: dict | None = None) -> list[Path]:
    """A cell whose pins could not be installed: one results file per mode saying so, with the resolver's words."""
    paths = []
    for mode in ("off", "on"):
        doc = _document(cell, mode, status, time.time(), install)
        doc.update(error={"type": status, "message": message[-4000:]}, cases=[], versions={})
        path = results_dir / results_name(cell.name, mode)
        write_json_atomic(path, doc)
        paths.append(path)
    return paths


def _document(cell: Cell, mode: str, status: str, started: float, install: dict | None) -> dict:
    return {
        "kind": KIND, "schema": SCHEMA_VERSION, "cell": cell.as_dict(), "mode": mode, "status": status,
        "shims_version": shims_version(), "code_digest": code_digest(), "machine": machine_label(), "started": started,
        "seconds": round(time.time() - started, 1), "install": install or {},
    }
