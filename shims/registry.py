"""One record per fix: what it touches upstream, whether it is needed, how to apply and undo it.

A patch is declared as data (a :class:`Patch`) in the module that owns its concern and listed once in
:data:`shims.PATCHES`. Nothing registers itself at import time. The registry only orchestrates:
drift check -> need check -> install, and remembers how to undo each install.

Several patches wrap the same upstream symbol (the 4-bit loaders and the checkpoint patch all wrap
``set_param_for_module``), each wrapping whatever is there when it installs. So the registry keeps the installs as a
stack and undoes them strictly last-in first-out, whatever subsets and orders ``apply()`` was called with. Every
replacement made through :func:`swap_attr` during an install is journaled, so an install that fails half-way is
rolled back, and ``restore()`` can check, before undoing anything, that nothing outside the registry has replaced a
wrapper since (undoing then would silently drop that code's wrapper).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger("shims")

Undo = Callable[[], None]


class DriftError(RuntimeError):
    """An upstream symbol or attribute the shims depend on is missing or changed at run time."""


class RestoreError(RuntimeError):
    """restore() refused: an attribute the shims replaced was replaced again by code outside the registry."""


@dataclass(frozen=True)
class Target:
    """An upstream symbol a patch touches and the parameters it expects that symbol to accept.

    ``expects`` lists parameter names the symbol must accept for the patch to be valid.

    ``on_instances``: the last part of ``qualname`` is an attribute that instances of the class before it carry
    (set in ``__init__``, so it cannot be looked up on the class), e.g. peft's
    ``ParamWrapper._did_swap_in_out_features``. It counts as present when code of that class or a base sets or
    reads it (:func:`code_mentions`).
    """

    module: str
    qualname: str
    expects: tuple[str, ...] = ()
    on_instances: bool = False

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.qualname}"

    def locate(self) -> tuple[object, str]:
        """(the object that holds the symbol, the symbol's attribute name), or raise LookupError naming what is
        missing. The holder is what a patch swaps the attribute on (a module or a class)."""
        try:
            holder = importlib.import_module(self.module)
        except ImportError as exc:
            raise LookupError(f"module {self.module} cannot be imported ({exc})") from exc
        *path, attr = self.qualname.split(".")
        for part in path:
            if not hasattr(holder, part):
                raise LookupError(f"{self.symbol} not found")
            holder = getattr(holder, part)
        if self.on_instances:
            if not (isinstance(holder, type) and code_mentions(holder, attr)):
                raise LookupError(f"no code of {self.module}.{'.'.join(path)} sets or reads {attr} (an attribute "
                                  "of its instances)")
        elif not hasattr(holder, attr):
            raise LookupError(f"{self.symbol} not found")
        return holder, attr

    def resolve(self):
        """Return the upstream object (for an ``on_instances`` target: the class), or raise LookupError."""
        holder, attr = self.locate()
        return holder if self.on_instances else getattr(holder, attr)

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
    the callable that undoes it; it must make its upstream changes through :func:`swap_attr`, which is what lets the
    registry roll back a failed install and check a restore. ``optional_targets`` are drift-checked and reported
    but do not block.
    """

    name: str
    summary: str
    targets: tuple[Target, ...]
    needed: Callable[[], str | None]
    install: Callable[[], Undo]
    optional_targets: tuple[Target, ...] = ()
    # What an applied patch found at run time (e.g. modules it declined), read when status() is asked: {key: value}.
    details: Callable[[], dict] | None = None


@dataclass
class PatchStatus:
    name: str
    summary: str
    applied: bool
    reason: str
    drift: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "applied": self.applied,
            "reason": self.reason,
            "drift": dict(self.drift),
            "details": dict(self.details),
        }


@dataclass
class _Installed:
    """One applied patch on the registry's stack: the undo its install returned and the swaps it made."""

    name: str
    undo: Undo
    swaps: tuple[Swap, ...]

    def revert(self) -> None:
        self.undo()
        # Swaps are idempotent: this is a no-op for those the patch's own undo reverted, and reverts any it left out.
        _revert_swaps(self.swaps)


class Registry:
    """Applies and restores an ordered collection of patches; every outcome is kept for status()."""

    def __init__(self, patches: Iterable[Patch]):
        self.patches = tuple(patches)
        names = [p.name for p in self.patches]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate patch names in {names}")
        self._installed: list[_Installed] = []  # a stack, in the order of application
        self._status: dict[str, PatchStatus] = {}

    def apply(self, only: Iterable[str] | None = None) -> list[PatchStatus]:
        """Apply the patches named in ``only`` (default: all) that are needed and not applied yet, in declaration
        order. An install that raises is rolled back and its error re-raised; patches applied before it stay."""
        wanted = self._select(only)
        for patch in self.patches:
            if patch.name not in wanted or self.is_applied(patch.name):
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
        with _journal() as swaps:
            try:
                undo = patch.install()
            except BaseException as exc:
                # Not a catch-all: whatever stopped the install (even KeyboardInterrupt), put back what it had
                # already replaced, record why for status(), and let the error through.
                _revert_swaps(swaps)
                reason = f"install failed and was rolled back: {type(exc).__name__}: {exc}"
                self._status[patch.name] = PatchStatus(patch.name, patch.summary, False, reason, drift)
                log.warning("shim %s: install failed, %d replacement(s) rolled back", patch.name, len(swaps))
                raise
        self._installed.append(_Installed(patch.name, undo, tuple(swaps)))
        log.info("shim %s applied", patch.name)
        return PatchStatus(patch.name, patch.summary, True, "applied", drift)

    def restore(self) -> None:
        """Undo every applied patch, the last applied first.

        All or nothing, on purpose: patches wrap one another's wrappers (patch X wraps a symbol, patch Y later wraps
        X's wrapper), so undoing X alone would either drop Y's wrapper or leave X's code running inside it. For the
        same reason restore() refuses, with RestoreError and before undoing anything, when code outside this
        registry replaced a wrapper after a patch installed it; restore again once that code has undone its change.
        """
        foreign = self._replaced_since_install()
        if foreign:
            raise RestoreError(
                "not restoring: replaced again after the shims wrapped them (by other code or another "
                f"Registry): {'; '.join(foreign)}. Undo that replacement first, then call restore() again")
        while self._installed:
            installed = self._installed[-1]
            installed.revert()
            self._installed.pop()  # only once reverted: if an undo raises, a later restore() finishes the job
            log.info("shim %s restored", installed.name)
        self._status.clear()

    def _replaced_since_install(self) -> list[str]:
        """Each swapped attribute whose value is not the one the swap put there, at the point of the unwinding
        where that swap would be undone (last install first)."""
        unwound: dict[tuple[int, str], object] = {}  # (id of holder, attribute) -> its value at this point
        foreign = []
        for installed in reversed(self._installed):
            for swap in reversed(installed.swaps):
                if not swap.active:
                    continue
                key = (id(swap.owner), swap.name)
                value = unwound.get(key, swap.current())
                if value is not swap.new:
                    foreign.append(f"{swap.symbol} (wrapped by shim {installed.name})")
                unwound[key] = swap.old
        return foreign

    def status(self) -> list[PatchStatus]:
        out = []
        for patch in self.patches:
            if patch.name in self._status:
                out.append(self._with_details(patch, self._status[patch.name]))
            else:
                drift = {t.symbol: t.drift() for t in patch.targets + patch.optional_targets}
                out.append(PatchStatus(patch.name, patch.summary, False, "not applied: apply() not called", drift))
        return out

    def _with_details(self, patch: Patch, status: PatchStatus) -> PatchStatus:
        # read now, not at apply(): details describe what the installed patch met since (models loaded later)
        if not (status.applied and patch.details):
            return status
        return dataclasses.replace(status, details=dict(patch.details()))

    def is_applied(self, name: str) -> bool:
        return any(installed.name == name for installed in self._installed)

    def _select(self, only: Iterable[str] | None) -> set[str]:
        names = {p.name for p in self.patches}
        if only is None:
            return names
        chosen = set(only)
        unknown = chosen - names
        if unknown:
            raise ValueError(f"unknown shim(s) {sorted(unknown)}; known: {sorted(names)}")
        return chosen


# --------------------------------------------------------------------------------------------------------------
# replacing upstream attributes


_ABSENT = object()  # an attribute that was not in the holder's own __dict__ (inherited, or not there at all)

# Open journals, innermost last: every swap_attr while one is open is recorded in it (see Registry._apply_one).
_journals: list[list[Swap]] = []


@contextmanager
def _journal() -> Iterator[list[Swap]]:
    swaps: list[Swap] = []
    _journals.append(swaps)
    try:
        yield swaps
    finally:
        _journals.pop()


class Swap:
    """One attribute replaced by :func:`swap_attr`; calling it puts the old value back (once: later calls do nothing).

    It refuses (RestoreError) when the attribute no longer holds what the swap put there: something wrapped it
    again, and putting the old value back would silently drop that wrapper.
    """

    def __init__(self, owner, name: str, new):
        self.owner, self.name, self.new = owner, name, new
        self.old = vars(owner).get(name, _ABSENT)  # own __dict__ only: an inherited attribute is restored by delattr
        setattr(owner, name, new)
        self.active = True

    @property
    def symbol(self) -> str:
        owner = self.owner
        prefix = owner.__name__ if not isinstance(owner, type) else f"{owner.__module__}.{owner.__qualname__}"
        return f"{prefix}.{self.name}"

    def current(self):
        return vars(self.owner).get(self.name, _ABSENT)

    def __call__(self) -> None:
        if not self.active:
            return
        if self.current() is not self.new:
            raise RestoreError(f"{self.symbol} was replaced again after the shims wrapped it; not restoring it")
        if self.old is _ABSENT:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.old)
        self.active = False


def swap_attr(owner, name: str, new) -> Swap:
    """Replace ``owner.name`` with ``new`` and return the undo. Works for classes and modules."""
    swap = Swap(owner, name, new)
    if _journals:
        _journals[-1].append(swap)
    return swap


def _revert_swaps(swaps: Iterable[Swap]) -> None:
    for swap in reversed(list(swaps)):
        swap()


def chain_undo(undos: Iterable[Undo]) -> Undo:
    undos = list(undos)

    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo


# --------------------------------------------------------------------------------------------------------------
# feature detection of instance attributes


@functools.lru_cache(maxsize=None)
def code_mentions(cls: type, name: str) -> bool:
    """Whether a function defined on ``cls`` or one of its bases reads or sets an attribute called ``name``.

    For attributes that instances get in ``__init__`` (invisible on the class): the only way to tell, without an
    instance, whether a library version has one. Functions the shims wrapped are looked through (``__wrapped__``).
    """
    return any(_code_names(function.__code__, name) for klass in inspect.getmro(cls)
               for function in _functions_of(klass))


def _functions_of(klass: type) -> Iterator:
    for member in vars(klass).values():
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        elif isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            yield inspect.unwrap(member)


def _code_names(code, name: str) -> bool:
    # ``self.x`` compiles to a name in co_names; nested functions and comprehensions are code objects in co_consts.
    return name in code.co_names or any(_code_names(const, name) for const in code.co_consts
                                        if inspect.iscode(const))


# --------------------------------------------------------------------------------------------------------------
# feature detection shared by the patches that fix a list of declared upstream classes


def present_holders(targets: Iterable[Target]) -> Iterator[tuple[Target, object]]:
    """(target, the object holding its symbol) for each declared target this installation has; targets of models
    (or modules) the installed library lacks are skipped, since declared lists span several versions."""
    for target in targets:
        try:
            holder, _ = target.locate()
        except LookupError:
            continue
        yield target, holder


def package_source_matches(package: str, files: str, pattern: re.Pattern) -> bool:
    """True when a file of the installed ``package`` matching the glob ``files`` (relative to its folder) contains
    ``pattern``. Read from its files without importing it: importing trl, say, is slow and may not be wanted."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    folder = Path(list(spec.submodule_search_locations)[0])
    return any(pattern.search(path.read_text(encoding="utf-8", errors="replace"))
               for path in sorted(folder.glob(files)))
