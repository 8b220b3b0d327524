"""One record per fix: what it touches upstream, whether it is needed, how to apply and undo it.

A patch is declared as data (a :class:`Patch`) in the module that owns its concern and listed once in
:data:`shims.PATCHES`. Nothing registers itself at import time. The registry only orchestrates:
drift check -> need check -> install, and remembers how to undo each install.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

log = logging.getLogger("shims")

Undo = Callable[[], None]


@dataclass(frozen=True)
class Target:
    """An upstream symbol a patch touches and the parameters it expects that symbol to accept.

    ``expects`` lists parameter names the symbol must accept for the patch to be valid.
    """

    module: str
    qualname: str
    expects: tuple[str, ...] = ()

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.qualname}"

    def resolve(self):
        """Return the upstream object, or raise LookupError naming what is missing."""
        try:
            obj = importlib.import_module(self.module)
        except ImportError as exc:
            raise LookupError(f"module {self.module} cannot be imported ({exc})") from exc
        for part in self.qualname.split("."):
            if not hasattr(obj, part):
                raise LookupError(f"{self.symbol} not found")
            obj = getattr(obj, part)
        return obj

    def drift(self) -> str:
        """'ok', 'missing: ...' or 'signature changed: ...' for the installed upstream version."""
        try:
            obj = self.resolve()
        except LookupError as exc:
            return f"missing: {exc}"
        if not self.expects:
            return "ok"
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            return f"signature changed: {self.symbol} has no inspectable signature"
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        absent = [name for name in self.expects if name not in params and not has_var_kw]
        if absent:
            return f"signature changed: {self.symbol} lacks {', '.join(absent)}"
        return "ok"


@dataclass(frozen=True)
class Patch:
    """A compatibility fix.

    ``needed()`` returns None when the fix is needed on the installed versions, otherwise a reason why not
    (feature absent, fixed upstream, optional dependency missing). ``install()`` applies the fix and returns
    the callable that undoes it. ``optional_targets`` are drift-checked and reported but do not block.
    """

    name: str
    summary: str
    targets: tuple[Target, ...]
    needed: Callable[[], str | None]
    install: Callable[[], Undo]
    optional_targets: tuple[Target, ...] = ()


@dataclass
class PatchStatus:
    name: str
    summary: str
    applied: bool
    reason: str
    drift: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "applied": self.applied,
            "reason": self.reason,
            "drift": dict(self.drift),
        }


class Registry:
    """Applies and restores an ordered collection of patches; every outcome is kept for status()."""

    def __init__(self, patches: Iterable[Patch]):
        self.patches = tuple(patches)
        names = [p.name for p in self.patches]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate patch names in {names}")
        self._undo: dict[str, Undo] = {}
        self._status: dict[str, PatchStatus] = {}

    def apply(self, only: Iterable[str] | None = None) -> list[PatchStatus]:
        wanted = self._select(only)
        for patch in self.patches:
            if patch.name not in wanted or patch.name in self._undo:
                continue
            self._status[patch.name] = self._apply_one(patch)
        return self.status()

    def _apply_one(self, patch: Patch) -> PatchStatus:
        drift = {t.symbol: t.drift() for t in patch.targets + patch.optional_targets}
        broken = [f"{sym}: {state}" for sym, state in drift.items()
                  if state != "ok" and any(t.symbol == sym for t in patch.targets)]
        if broken:
            reason = "drift: " + "; ".join(broken)
            log.warning("shim %s not applied (%s)", patch.name, reason)
            return PatchStatus(patch.name, patch.summary, False, reason, drift)
        reason = patch.needed()
        if reason is not None:
            log.debug("shim %s not needed: %s", patch.name, reason)
            return PatchStatus(patch.name, patch.summary, False, f"not needed: {reason}", drift)
        self._undo[patch.name] = patch.install()
        log.info("shim %s applied", patch.name)
        return PatchStatus(patch.name, patch.summary, True, "applied", drift)

    def restore(self) -> None:
        for patch in reversed(self.patches):
            undo = self._undo.pop(patch.name, None)
            if undo is not None:
                undo()
                log.info("shim %s restored", patch.name)
        self._status.clear()

    def status(self) -> list[PatchStatus]:
        out = []
        for patch in self.patches:
            if patch.name in self._status:
                out.append(self._status[patch.name])
            else:
                drift = {t.symbol: t.drift() for t in patch.targets + patch.optional_targets}
                out.append(PatchStatus(patch.name, patch.summary, False, "not applied: apply() not called", drift))
        return out

    def is_applied(self, name: str) -> bool:
        return name in self._undo

    def _select(self, only: Iterable[str] | None) -> set[str]:
        names = {p.name for p in self.patches}
        if only is None:
            return names
        chosen = set(only)
        unknown = chosen - names
        if unknown:
            raise ValueError(f"unknown shim(s) {sorted(unknown)}; known: {sorted(names)}")
        return chosen


def swap_attr(owner, name: str, new) -> Undo:
    """Replace ``owner.name`` with ``new`` and return the undo. Works for classes and modules."""
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, new)

    def undo() -> None:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)

    return undo


def chain_undo(undos: Iterable[Undo]) -> Undo:
    undos = list(undos)

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo
