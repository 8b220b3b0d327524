"""Properties of apply() / restore() over random sequences of calls.

- restore() puts back every upstream object any patch touched, whatever subsets and orders apply() ran with
  (several patches wrap the same symbol, so undoing has to be last-in first-out);
- an install that fails half-way is rolled back and the registry stays consistent;
- status() agrees with what is applied after every call.

Fake patches over a throwaway module check the stacking exactly; the real patch list checks the installed
transformers / peft. Only the registry's long-standing API is used here (Patch, Registry, swap_attr, chain_undo),
so these tests also run against older registries.
"""

import functools
import importlib
import sys
import types

import pytest

pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from shims import registry as registry_module  # noqa: E402
from shims.registry import Patch, Registry, chain_undo, swap_attr  # noqa: E402

_ABSENT = object()  # an attribute that is not in its holder's own __dict__


class InjectedFailure(RuntimeError):
    """The error a test plants in an install."""


def _own(holder, attr):
    return vars(holder).get(attr, _ABSENT)


# ---- fake patches: the stacking, checked exactly ---------------------------------------------------------------
_FAKE_SYMBOLS = ("f", "g")
# name -> the symbols it wraps, in declaration order. "boom" wraps f and g, then its install raises.
_FAKE_PATCHES = {"p0": ("f",), "p1": ("f", "g"), "p2": ("g",), "p3": ("f",), "boom": ("f", "g")}
_FAKE_NAMES = tuple(_FAKE_PATCHES)


def _fake_upstream():
    mod = types.ModuleType("fake_upstream_for_properties")
    for symbol in _FAKE_SYMBOLS:
        setattr(mod, symbol, lambda: [])  # returns the tags of the wrappers around it, innermost first
    return mod


def _fake_patch(mod, name, symbols):
    def install():
        undos = []
        for symbol in symbols:
            inner = getattr(mod, symbol)
            undos.append(swap_attr(mod, symbol, lambda _inner=inner: _inner() + [name]))
        if name == "boom":
            raise InjectedFailure("install failed after wrapping f and g")
        return chain_undo(undos)

    return Patch(name, f"wraps {symbols}", (), lambda: None, install)


_fake_op = st.one_of(
    st.just(("apply", None)),
    st.tuples(st.just("apply"), st.lists(st.sampled_from(_FAKE_NAMES), unique=True).map(tuple)),
    st.just(("restore", None)),
)


@settings(max_examples=300, deadline=None)
@example(ops=[("apply", ("p1",)), ("apply", ("p0",)), ("restore", None)])
@example(ops=[("apply", ("p0", "boom")), ("restore", None)])
@given(ops=st.lists(_fake_op, min_size=1, max_size=10))
def test_fake_patches_stack_and_unwind_last_in_first_out(ops):
    mod = _fake_upstream()
    originals = {symbol: getattr(mod, symbol) for symbol in _FAKE_SYMBOLS}
    registry = Registry([_fake_patch(mod, name, symbols) for name, symbols in _FAKE_PATCHES.items()])
    order = []  # the model: names of the applied patches, in the order they were applied
    for kind, names in ops:
        if kind == "restore":
            registry.restore()
            order.clear()
            assert all(getattr(mod, s) is originals[s] for s in _FAKE_SYMBOLS), "restore() left a wrapper"
            continue
        wanted = set(_FAKE_NAMES if names is None else names)
        # apply() goes through the patches in declaration order; "boom" is last and raises after its swaps.
        order += [n for n in _FAKE_NAMES if n in wanted and n not in order and n != "boom"]
        if "boom" in wanted:
            with pytest.raises(InjectedFailure):
                registry.apply(names)
        else:
            registry.apply(names)
        for symbol in _FAKE_SYMBOLS:
            expected = [n for n in order if symbol in _FAKE_PATCHES[n]]
            assert getattr(mod, symbol)() == expected, f"{symbol}: wrappers differ from the applied patches"
        applied = {s.name for s in registry.status() if s.applied}
        assert applied == set(order), "status() disagrees with what is applied"
        assert all(registry.is_applied(n) == (n in order) for n in _FAKE_NAMES)
    registry.restore()
    assert all(getattr(mod, s) is originals[s] for s in _FAKE_SYMBOLS), "restore() left a wrapper"
    assert not any(s.applied for s in registry.status())


def test_fake_failed_install_rolls_back_and_reports_it():
    mod = _fake_upstream()
    originals = {symbol: getattr(mod, symbol) for symbol in _FAKE_SYMBOLS}
    registry = Registry([_fake_patch(mod, "p0", ("f",)), _fake_patch(mod, "boom", ("f", "g"))])
    with pytest.raises(InjectedFailure):
        registry.apply()
    assert mod.f() == ["p0"] and mod.g is originals["g"], "the failed install's swaps must be undone"
    status = {s.name: s for s in registry.status()}
    assert status["p0"].applied and not status["boom"].applied
    assert "InjectedFailure" in status["boom"].reason, status["boom"].reason
    registry.restore()
    assert all(getattr(mod, s) is originals[s] for s in _FAKE_SYMBOLS)


# ---- the real patch list on the installed versions -------------------------------------------------------------
pytest.importorskip("transformers")
pytest.importorskip("peft")

from shims.patches import build_registry  # noqa: E402

_PATCHES = build_registry().patches
_NAMES = tuple(p.name for p in _PATCHES)


def _location(target):
    """(holder, attribute) of a declared target, or None where this version lacks its module or holder."""
    try:
        holder = importlib.import_module(target.module)
    except ImportError:
        return None
    *path, attr = target.qualname.split(".")
    for part in path:
        holder = getattr(holder, part, _ABSENT)
        if holder is _ABSENT:
            return None
    return holder, attr


def _declared_locations(patches) -> dict:
    """(id(holder), attr) -> (holder, attr, symbol) for every target and optional target of ``patches``."""
    out = {}
    for patch in patches:
        for target in patch.targets + patch.optional_targets:
            location = _location(target)
            if location is not None:
                out[(id(location[0]), location[1])] = (*location, target.symbol)
    return out


def _is_code(value) -> bool:
    """Functions, classes and their descriptors: what patches replace. Declared targets that are state instead
    (torch's parametrize._cache dict, which torch itself rebinds whenever a cached() block ends) are left out."""
    return value is _ABSENT or callable(value) or isinstance(value, (classmethod, staticmethod, property))


# Taken when this module is imported, i.e. before any test of the session applies a patch.
_ORIGINALS = {key: (holder, attr, symbol, _own(holder, attr))
              for key, (holder, attr, symbol) in _declared_locations(_PATCHES).items()
              if _is_code(_own(holder, attr))}


def _current() -> dict:
    """(id(holder), attr) -> what each declared target's holder holds now."""
    return {key: _own(holder, attr) for key, (holder, attr, _, _) in _ORIGINALS.items()}


def _changed_since(before: dict) -> list[str]:
    now = _current()
    return [_ORIGINALS[key][2] for key, value in before.items() if now[key] is not value]


def _changed_symbols() -> list[str]:
    """The declared targets that no longer hold their original object."""
    return _changed_since({key: original for key, (_, _, _, original) in _ORIGINALS.items()})


def _put_originals_back() -> None:
    """After a failed check: undo by hand what the registry left, so that one failure does not cascade."""
    for holder, attr, _, original in _ORIGINALS.values():
        if _own(holder, attr) is original:
            continue
        if original is _ABSENT:
            delattr(holder, attr)
        else:
            setattr(holder, attr, original)


@functools.lru_cache(maxsize=None)
def _applicable() -> frozenset:
    """The patches that apply on the installed versions, each applied alone."""
    names = set()
    for name in _NAMES:
        registry = build_registry()
        try:
            if {s.name: s for s in registry.apply(only=[name])}[name].applied:
                names.add(name)
        finally:
            registry.restore()
    assert not _changed_symbols(), "applying one patch and restoring it left upstream changed"
    return frozenset(names)


def _assert_status_matches(registry, applied: set) -> None:
    status = {s.name: s for s in registry.status()}
    assert {n for n, s in status.items() if s.applied} == applied, "status() disagrees with what is applied"
    assert all(s.applied == (s.reason == "applied") for s in status.values())
    assert all(registry.is_applied(n) == (n in applied) for n in _NAMES)


_real_op = st.one_of(
    st.just(("apply", None)),
    st.tuples(st.just("apply"), st.lists(st.sampled_from(_NAMES), unique=True).map(tuple)),
    st.just(("restore", None)),
)


@settings(max_examples=60, deadline=None)
@example(ops=[("apply", ("quantize_moe_routers",)), ("apply", None), ("restore", None)])  # measured on 5.24
@given(ops=st.lists(_real_op, min_size=1, max_size=8))
def test_restore_returns_every_touched_upstream_object(ops):
    applicable = _applicable()  # first: it applies and restores patches itself
    assert not _changed_symbols(), "upstream was already changed before this example"
    registry = build_registry()
    applied = set()
    try:
        for kind, names in ops:
            if kind == "restore":
                registry.restore()
                applied.clear()
                assert _changed_symbols() == [], "restore() left these wrapped"
            else:
                registry.apply(names)
                applied |= applicable & set(_NAMES if names is None else names)
            _assert_status_matches(registry, applied)
        registry.restore()
        assert _changed_symbols() == [], "restore() left these wrapped"
        _assert_status_matches(registry, set())
    finally:
        _put_originals_back()


# ---- installs that fail on the real patches --------------------------------------------------------------------
class _SwapSpy:
    """Stands in for swap_attr in every shims module: records each replacement and can fail the n-th one."""

    def __init__(self):
        self.calls = []  # (holder, attr) in call order
        self.fail_at = None  # 1-based index of the call that raises instead of swapping

    def __call__(self, owner, name, new):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise InjectedFailure(f"swap of {name} refused (injected)")
        self.calls.append((owner, name))
        return swap_attr(owner, name, new)


@pytest.fixture
def swap_spy(monkeypatch):
    spy = _SwapSpy()
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("shims.") and getattr(module, "swap_attr", None) is registry_module.swap_attr \
                and module is not registry_module:
            monkeypatch.setattr(module, "swap_attr", spy)
    return spy


def _swaps_of(name, spy) -> list:
    spy.calls.clear()
    registry = build_registry()
    try:
        registry.apply(only=[name])
    finally:
        registry.restore()
    return list(spy.calls)


@pytest.mark.parametrize("name", _NAMES)
def test_failed_install_of_a_real_patch_is_rolled_back(name, swap_spy):
    """The patch's last replacement fails (as when upstream changed under it), after all other patches applied:
    its earlier replacements are undone, the others stay, status() says so, and restore() still works."""
    applicable = _applicable()
    if name not in applicable:
        pytest.skip(f"{name} does not apply on these versions")
    swaps = _swaps_of(name, swap_spy)
    assert swaps, f"{name} applied without replacing anything"
    registry = build_registry()
    try:
        others = set(_NAMES) - {name}
        registry.apply(only=others)
        before = _current()
        swap_spy.calls.clear()
        swap_spy.fail_at = len(swaps)
        with pytest.raises(InjectedFailure):
            registry.apply(only=[name])
        assert _changed_since(before) == [], f"the failed install of {name} left these replaced"
        _assert_status_matches(registry, applicable & others)
        swap_spy.fail_at = None
        registry.apply(only=[name])  # the registry is still usable: the same patch applies once upstream allows it
        _assert_status_matches(registry, set(applicable))
        registry.restore()
        assert _changed_symbols() == [], "restore() after a failed install left these wrapped"
    finally:
        _put_originals_back()


@pytest.mark.parametrize("name", _NAMES)
def test_every_replaced_symbol_is_a_declared_target(name, swap_spy):
    """What a patch replaces is drift-checked and shown in status(): each swap is one of the patch's targets."""
    if name not in _applicable():
        pytest.skip(f"{name} does not apply on these versions")
    patch = next(p for p in _PATCHES if p.name == name)
    declared = _declared_locations([patch])
    undeclared = [f"{getattr(holder, '__qualname__', getattr(holder, '__name__', holder))}.{attr}"
                  for holder, attr in _swaps_of(name, swap_spy) if (id(holder), attr) not in declared]
    assert undeclared == [], f"{name} replaces symbols it does not declare as targets"
