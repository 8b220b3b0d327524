"""shims.adapters.lora_layout.did_swap_in_out_features: peft's ParamWrapper flag, read without a silent default."""

import pytest

from shims.adapters.lora_layout import SWAP_FLAG_TARGET, did_swap_in_out_features
from shims.registry import DriftError, code_mentions


class _Tracks:
    """Like peft >= 0.19's ParamWrapper: __init__ sets the flag."""

    def __init__(self, swapped):
        self._did_swap_in_out_features = swapped


class _NeverSwaps:
    """Like peft 0.18's ParamWrapper: no flag anywhere."""


@pytest.mark.parametrize("swapped", [False, True])
def test_reads_the_flag(swapped):
    assert did_swap_in_out_features(_Tracks(swapped)) is swapped


def test_a_class_without_the_flag_never_swaps():
    assert did_swap_in_out_features(_NeverSwaps()) is False


def test_missing_flag_on_a_class_that_sets_it_is_drift():
    wrapper = _Tracks.__new__(_Tracks)  # as if a peft refactor stopped setting it in __init__
    with pytest.raises(DriftError, match=r"_did_swap_in_out_features.*peft "):
        did_swap_in_out_features(wrapper)


def test_installed_peft_is_detected_by_its_code_and_declared():
    peft = pytest.importorskip("peft")
    from packaging.version import Version
    from peft.tuners.lora.layer import ParamWrapper

    # The flag came with peft 0.19.0; feature detection must agree with that on every installed version.
    has_flag = Version(peft.__version__) >= Version("0.19.0")
    assert code_mentions(ParamWrapper, "_did_swap_in_out_features") is has_flag
    assert (SWAP_FLAG_TARGET.drift() == "ok") is has_flag

    import shims

    fast = next(s for s in shims.status() if s["name"] == "fast_expert_lora")
    assert SWAP_FLAG_TARGET.symbol in fast["drift"]
