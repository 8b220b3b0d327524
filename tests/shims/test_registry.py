"""The registry's contract: drift check -> need check -> install, idempotent, reversible, every outcome
visible in status(). Uses small fake patches against a real module, plus the real patch list."""

import inspect
import sys
import types

import pytest

from shims.registry import Patch, Registry, RestoreError, Target, code_mentions, swap_attr


@pytest.fixture
def upstream(monkeypatch):
    """A stand-in upstream module with one function a patch replaces."""
    mod = types.ModuleType("fake_upstream")

    def convert(source, target, operations=None):
        return "native"

    mod.convert = convert
    monkeypatch.setitem(sys.modules, "fake_upstream", mod)
    return mod


def _patch(upstream, needed=lambda: None, expects=("source", "target")):
    def install():
        return swap_attr(upstream, "convert", lambda *a, **k: "patched")

    return Patch("fix_convert", "replace convert", (Target("fake_upstream", "convert", expects),), needed, install)


def test_apply_twice_is_a_noop_and_restore_undoes(upstream):
    reg = Registry([_patch(upstream)])
    reg.apply()
    first = upstream.convert
    reg.apply()
    assert upstream.convert is first and upstream.convert(1, 2) == "patched"
    assert [s.applied for s in reg.status()] == [True]
    reg.restore()
    assert upstream.convert(1, 2) == "native"
    assert reg.status()[0].reason.startswith("not applied")
    reg.apply()
    assert upstream.convert(1, 2) == "patched", "apply after restore works again"


def test_not_needed_is_reported_with_its_reason(upstream):
    reg = Registry([_patch(upstream, needed=lambda: "fixed upstream in 9.9")])
    status = reg.apply()[0]
    assert not status.applied and status.reason == "not needed: fixed upstream in 9.9"
    assert upstream.convert(1, 2) == "native"


def test_changed_signature_is_drift_and_nothing_is_patched(upstream, monkeypatch):
    def convert(sources, targets):  # upstream renamed its parameters
        return "native"

    monkeypatch.setattr(upstream, "convert", convert)
    status = Registry([_patch(upstream)]).apply()[0]
    assert not status.applied
    assert "drift" in status.reason and "lacks source, target" in status.reason
    assert status.drift["fake_upstream.convert"].startswith("signature changed")
    assert upstream.convert is convert


def test_missing_symbol_is_drift(upstream, monkeypatch):
    monkeypatch.delattr(upstream, "convert")
    status = Registry([_patch(upstream)]).apply()[0]
    assert not status.applied and "missing" in status.drift["fake_upstream.convert"]


def test_install_failure_is_raised_not_hidden(upstream):
    def install():
        raise TypeError("upstream changed in a way detection missed")

    reg = Registry([Patch("boom", "x", (Target("fake_upstream", "convert"),), lambda: None, install)])
    with pytest.raises(TypeError, match="detection missed"):
        reg.apply()
    status = reg.status()[0]
    assert not status.applied and "rolled back" in status.reason and "detection missed" in status.reason


def test_restore_refuses_while_other_code_wraps_a_shim_wrapper(upstream):
    """Undoing under someone else's wrapper would silently drop it: restore() refuses, changing nothing."""
    reg = Registry([_patch(upstream)])
    reg.apply()
    ours = upstream.convert
    upstream.convert = lambda *a, **k: "theirs, around " + ours(*a, **k)
    theirs = upstream.convert
    with pytest.raises(RestoreError, match="fake_upstream.convert"):
        reg.restore()
    assert upstream.convert is theirs and reg.is_applied("fix_convert") and reg.status()[0].applied
    upstream.convert = ours  # the other code undoes its wrapper; then restore() goes through
    reg.restore()
    assert upstream.convert(1, 2) == "native" and not reg.status()[0].applied


def test_instance_attribute_targets_are_found_in_the_class_code(upstream):
    class Keeps:
        def __init__(self):
            self.flag = False

    class Base:
        def reads(self):
            return [self.inherited for _ in range(1)]  # in a comprehension: a nested code object

    class Derived(Base):
        pass

    upstream.Keeps, upstream.Derived = Keeps, Derived
    assert Target("fake_upstream", "Keeps.flag", on_instances=True).drift() == "ok"
    assert code_mentions(Derived, "inherited") and not code_mentions(Derived, "flag")
    state = Target("fake_upstream", "Derived.flag", on_instances=True).drift()
    assert state.startswith("missing") and "flag" in state
    assert Target("fake_upstream", "Keeps.flag").drift().startswith("missing"), "not on the class itself"


def test_unknown_shim_name_is_rejected(upstream):
    with pytest.raises(ValueError, match="unknown shim"):
        Registry([_patch(upstream)]).apply(only=["nope"])


pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_real_patches_status_is_complete_and_apply_is_idempotent():
    import shims

    try:
        first = shims.apply()
        second = shims.apply()
        assert first == second
        for s in first:
            assert s["reason"] and isinstance(s["drift"], dict) and s["drift"], s["name"]
            assert s["applied"] == (s["reason"] == "applied")
    finally:
        shims.restore()
    assert not any(s["applied"] for s in shims.status())


def test_real_patches_with_a_simulated_signature_change(monkeypatch):
    """Upstream renames a parameter a shim relies on: that shim reports drift and stays off."""
    from shims.patches import build_registry

    registry = build_registry()
    patch = next(p for p in registry.patches if p.targets and p.targets[0].expects)
    target = patch.targets[0]
    owner_path, _, attr = target.qualname.rpartition(".")
    module = __import__(target.module, fromlist=["_"])
    holder = module
    for part in filter(None, owner_path.split(".")):
        holder = getattr(holder, part)
    original = getattr(holder, attr)

    def renamed(*args, renamed_kw=None):
        return original

    monkeypatch.setattr(holder, attr, renamed)
    try:
        status = {s.name: s for s in registry.apply()}[patch.name]
        assert not status.applied and status.reason.startswith("drift")
        assert status.drift[target.symbol].startswith("signature changed")
    finally:
        registry.restore()


def test_without_bitsandbytes_quantization_reports_why_and_others_apply(monkeypatch):
    from shims.patches import build_registry

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    registry = build_registry()
    try:
        statuses = {s.name: s for s in registry.apply()}
    finally:
        registry.restore()
    loaders = [statuses["quantize_fused_experts"], statuses["quantize_fused_experts_v4"]]
    assert not any(s.applied for s in loaders)
    # The one for this transformers' loader says bitsandbytes is missing; the other is not needed here anyway.
    assert sum("bitsandbytes is not installed" in s.reason for s in loaders) == 1
    others = [s for n, s in statuses.items() if n in ("weight_converter_kwargs", "all_linear_moe")]
    assert others and all(s.reason for s in others)


def test_present_holders_skips_what_this_installation_lacks():
    from shims.registry import Target, present_holders

    targets = (Target("json", "JSONDecoder.decode"), Target("json", "NoSuchClass.decode"),
               Target("no_such_module_here", "X.y"))
    assert [(t.qualname, h) for t, h in present_holders(targets)] == [("JSONDecoder.decode", __import__("json").JSONDecoder)]


def test_package_source_matches_reads_files_without_importing(tmp_path, monkeypatch):
    import re
    import sys

    from shims.registry import package_source_matches

    pkg = tmp_path / "probe_pkg_for_shims"
    (pkg / "trainer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "trainer" / "utils.py").write_text("x = config.num_experts\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_source_matches("probe_pkg_for_shims", "trainer/*.py", re.compile(r"config\.num_experts\b"))
    assert not package_source_matches("probe_pkg_for_shims", "trainer/*.py", re.compile(r"base_model"))
    assert not package_source_matches("no_such_package_here", "*.py", re.compile("x"))
    assert "probe_pkg_for_shims" not in sys.modules
