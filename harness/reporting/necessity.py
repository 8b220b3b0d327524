"""Is each shim still needed, per cell? And did its upstream symbols drift? Both derived from results files.

Necessity compares the native run (shims off) with the shimmed run (shims on) of a cell, case by case, on the
symptom the shim fixes. The symptoms are data: the [shim_symptoms] table of harness/matrix.toml. Per case:

    broken            the shimmed run shows the symptom
    needed            the native run shows it and the shimmed run does not
    not needed here   the native run does not show it either: a candidate for retiring the shim on this cell
    unproven          the shimmed run is clean but the native run cannot tell (the symptom's stage was not
                      reached, the case is missing, or its precondition does not hold natively)

A cell's entry is the worst of its cases (broken > needed > not needed here > unproven) with counts, or

    n/a               the shim was not applied on this cell (shims.status() says why: not needed, drift), or no
                      case of the shim's quantization ran there
    no shims run      the cell has no shimmed run that ran (yet)
    not exercised     no case shows the symptom the shim fixes yet ([shim_symptoms] says why)

Drift comes from the shims status each case process records (``environment.shims_status`` with shims on,
``environment.shims_status_native`` with shims off: status() without apply(), which patches nothing).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .. import verdict
from ..matrix import MATRIX_FILE, MatrixError
from ..results import case_key

NEEDED, NOT_NEEDED, BROKEN, UNPROVEN = "needed", "not needed here", "broken", "unproven"
NA, UNEXERCISED, UNDECLARED, NO_RUN = "n/a", "not exercised", "no symptom declared", "no shims run"
SEVERITY = (BROKEN, NEEDED, NOT_NEEDED, UNPROVEN)  # worst first
FAILED_STAGE = ("failed",) + verdict.ABORTED
KINDS = ("stage", "rule")
# what a case shows for a symptom
SHOWS, CLEAN, NOT_REACHED, UNAVAILABLE = "symptom", "clean", "not reached", "unavailable"


@dataclass(frozen=True)
class Symptom:
    shim: str
    checks: tuple[tuple[str, str], ...] = ()  # ("stage" | "rule", name)
    quant: str | None = None
    precondition: tuple[str, str] | None = None
    unexercised: str | None = None


def _parse_check(shim: str, text: str) -> tuple[str, str]:
    kind, _, name = str(text).partition(":")
    if kind not in KINDS or not name:
        raise MatrixError(f"[shim_symptoms.{shim}]: {text!r} is not 'stage:NAME' or 'rule:NAME'")
    if kind == "rule" and name not in {r.name for r in verdict.RULES}:
        raise MatrixError(f"[shim_symptoms.{shim}]: unknown rule {name!r}; rules: "
                          f"{', '.join(r.name for r in verdict.RULES)}")
    return kind, name


def load_symptoms(path: Path = MATRIX_FILE) -> dict[str, Symptom]:
    with open(path, "rb") as fh:
        table = tomllib.load(fh).get("shim_symptoms", {})
    out = {}
    for shim, spec in table.items():
        if not isinstance(spec, dict):
            raise MatrixError(f"[shim_symptoms.{shim}] must be a table")
        checks = tuple(_parse_check(shim, s) for s in spec.get("symptoms", ()))
        if not checks and not spec.get("unexercised"):
            raise MatrixError(f"[shim_symptoms.{shim}] needs symptoms = [...] or unexercised = \"why\"")
        pre = _parse_check(shim, spec["precondition"]) if spec.get("precondition") else None
        out[shim] = Symptom(shim, checks, spec.get("quant"), pre, spec.get("unexercised"))
    return out


# -- one case ------------------------------------------------------------------------------------------------

def _observe_one(case: dict, kind: str, name: str) -> str:
    if kind == "stage":
        status = case.get("stages", {}).get(name, {}).get("status")
        if status == "ok":
            return CLEAN
        return SHOWS if status in FAILED_STAGE else NOT_REACHED
    rule = next(r for r in verdict.RULES if r.name == name)
    if not rule.applies(case):
        return NOT_REACHED
    return CLEAN if rule.holds(case) else SHOWS


def observe(case: dict, checks) -> str:
    """symptom if any check shows it; not reached if one could not be evaluated; clean otherwise."""
    if any(s.get("status") == "unavailable" for s in case.get("stages", {}).values()):
        return UNAVAILABLE
    seen = [_observe_one(case, kind, name) for kind, name in checks]
    if SHOWS in seen:
        return SHOWS
    return NOT_REACHED if NOT_REACHED in seen else CLEAN


def case_outcome(native: dict | None, shimmed: dict, symptom: Symptom) -> str | None:
    """One case's necessity (see the module docstring); None when the arch does not exist on this cell."""
    with_shims = observe(shimmed, symptom.checks)
    if with_shims == UNAVAILABLE:
        return None
    if with_shims == SHOWS:
        return BROKEN
    if with_shims == NOT_REACHED or native is None:
        return UNPROVEN
    if symptom.precondition and observe(native, (symptom.precondition,)) != CLEAN:
        return UNPROVEN
    without = observe(native, symptom.checks)
    return {SHOWS: NEEDED, CLEAN: NOT_NEEDED}.get(without, UNPROVEN)


# -- per shim x cell -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    label: str
    detail: str = ""


def _cases(doc: dict | None) -> dict[str, dict]:
    if doc is None or doc["status"] != "ran":
        return {}
    return {case_key(c): c for c in doc["cases"]}


def _status_list(doc: dict | None, key: str) -> list[dict] | None:
    value = ((doc or {}).get("environment") or {}).get(key)
    return value if isinstance(value, list) else None


def shim_names(docs: list[dict]) -> list[str]:
    """Every shim named in any recorded status, in the order the runs list them."""
    names: dict[str, None] = {}
    for doc in docs:
        for key in ("shims_status", "shims_status_native"):
            for status in _status_list(doc, key) or []:
                names.setdefault(status["name"], None)
    return list(names)


def _runs_by_cell(docs: list[dict]) -> dict[str, dict[str, dict]]:
    """cell -> mode -> the first run that ran (or the first run at all)."""
    out: dict[str, dict[str, dict]] = {}
    for doc in docs:
        slot = out.setdefault(doc["cell"]["name"], {})
        current = slot.get(doc["mode"])
        if current is None or (current["status"] != "ran" and doc["status"] == "ran"):
            slot[doc["mode"]] = doc
    return out


def necessity_entry(shim: str, native_doc: dict | None, shims_doc: dict | None,
                    symptom: Symptom | None) -> Entry:
    statuses = _status_list(shims_doc, "shims_status")
    if shims_doc is None:
        return Entry(NO_RUN)
    if shims_doc["status"] != "ran":
        return Entry(NO_RUN, f"the shimmed run did not run ({shims_doc['status']})")
    if statuses is None:
        return Entry(NA, "the shimmed run recorded no shims status")
    status = next((s for s in statuses if s.get("name") == shim), None)
    if status is None:
        return Entry(NA, "not in that run's shims version")
    if not status.get("applied"):
        return Entry(NA, status.get("reason", "not applied"))
    if symptom is None:
        return Entry(UNDECLARED, "add it to [shim_symptoms] in harness/matrix.toml")
    if symptom.unexercised:
        return Entry(UNEXERCISED, symptom.unexercised)
    native_cases = _cases(native_doc)
    outcomes: dict[str, list[str]] = {}
    for case_id, case in _cases(shims_doc).items():
        if symptom.quant and case.get("quant") != symptom.quant:
            continue
        outcome = case_outcome(native_cases.get(case_id), case, symptom)
        if outcome is not None:
            outcomes.setdefault(outcome, []).append(case_id)
    if not outcomes:
        return Entry(NA, f"no {symptom.quant + ' ' if symptom.quant else ''}case ran here")
    total = sum(len(v) for v in outcomes.values())
    worst = next(label for label in SEVERITY if label in outcomes)
    detail = "; ".join(f"{label}: {', '.join(sorted(outcomes[label]))}" for label in SEVERITY if label in outcomes)
    return Entry(f"{worst} ({len(outcomes[worst])}/{total})", detail)


def necessity(docs: list[dict], symptoms: dict[str, Symptom]) -> dict[str, dict[str, Entry]]:
    """shim -> cell -> Entry, for every shim any run recorded and every cell with a run."""
    runs = _runs_by_cell(docs)
    return {shim: {cell: necessity_entry(shim, modes.get("off"), modes.get("on"), symptoms.get(shim))
                   for cell, modes in sorted(runs.items())}
            for shim in shim_names(docs)}


def _drift_label(status: dict) -> tuple[str, list[str]]:
    states = status.get("drift") or {}
    bad = [f"{sym}: {state}" for sym, state in states.items() if state != "ok"]
    kinds = sorted({state.split(":", 1)[0] for state in states.values() if state != "ok"})
    drift = " + ".join(kinds) if kinds else ("ok" if states else "ok (no targets)")
    reason = status.get("reason", "")
    if status.get("applied"):
        applied = "applied"
    elif reason.startswith("not needed"):
        applied = "not needed"
    elif reason.startswith("drift"):
        applied = "NOT APPLIED (drift)"
    else:
        applied = "not applied"
    return f"{drift}, {applied}", bad


def drift(docs: list[dict]) -> dict[str, dict[str, Entry]]:
    """shim -> cell -> Entry(label, details): drift of its upstream symbols and whether it applied.

    The shimmed run's status is used (it says whether the shim applied); a cell with only a native run falls
    back to the native status (drift only)."""
    runs = _runs_by_cell(docs)
    out: dict[str, dict[str, Entry]] = {}
    for shim in shim_names(docs):
        for cell, modes in sorted(runs.items()):
            status, source = None, ""
            for mode, key in (("on", "shims_status"), ("off", "shims_status_native")):
                found = next((s for s in _status_list(modes.get(mode), key) or [] if s.get("name") == shim), None)
                if found is not None:
                    status, source = found, mode
                    break
            if status is None:
                out.setdefault(shim, {})[cell] = Entry("not recorded")
                continue
            label, bad = _drift_label(status)
            if source == "off":
                label = label.replace(", not applied", ", native run only")
            out.setdefault(shim, {})[cell] = Entry(label, "; ".join(bad))
    return out
