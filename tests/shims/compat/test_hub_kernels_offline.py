"""shims.compat.hub_kernels_offline: from_pretrained offline with a default hub kernel missing from the local cache.

On a GPU (measured on an H100, transformers 5.25) the default kernel mapping sends RMSNorm to
kernels-community/liger-kernels v4, and offline with an empty kernels cache the load raises. On CPU the default mapping
has no entry, so these tests add the same repository for "cpu" to transformers' default mapping: from there on the
real upstream code runs (kernels resolves v4 from the empty local cache and raises its own ValueError), nothing is
mocked at the call site.
"""

import logging

import pytest

from conftest import lx_build_tiny_moe, q4_ids

pytestmark = pytest.mark.needs_ml

OFFLINE_ERROR = ("Version 4 of 'kernels-community/liger-kernels' is not available in the local cache and Hugging "
                 "Face Hub is in offline mode")


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub_kernels_qwen3_moe")
    lx_build_tiny_moe("qwen3_moe").save_pretrained(path)
    return str(path)


def _requires_default_kernelization():
    from shims.compat import hub_kernels_offline

    if not hub_kernels_offline.kernelizes_by_default():
        pytest.skip("this transformers' from_pretrained does not kernelize by default")
    pytest.importorskip("kernels")


@pytest.fixture
def offline_missing_kernel(monkeypatch, tmp_path):
    """Hub offline, an empty kernels cache, and the GPU's RMSNorm kernel mapped for CPU too; the kernels library's
    global mapping is restored afterwards."""
    _requires_default_kernelization()
    from huggingface_hub import constants
    from kernels import LayerRepository, use_kernel_mapping
    from transformers.integrations import hub_kernels

    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path / "kernels-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    mapping = dict(hub_kernels.get_kernel_mapping_transformers())
    liger = LayerRepository(repo_id="kernels-community/liger-kernels", layer_name="LigerRMSNorm", version=4)
    mapping["RMSNorm"] = {**mapping["RMSNorm"], "cpu": liger}
    monkeypatch.setattr(hub_kernels, "_KERNEL_MAPPING_CACHE", mapping)
    with use_kernel_mapping({}, inherit_mapping=True):  # from_pretrained registers into a copy, dropped on exit
        yield


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _logits(model):
    import torch

    with torch.no_grad():
        return model(q4_ids()).logits


def test_offline_missing_kernel_falls_back_to_own_layers(float_checkpoint, offline_missing_kernel, monkeypatch,
                                                         caplog):
    import torch
    from transformers import modeling_utils

    import shims

    _requires_default_kernelization()
    native_kernelize = modeling_utils.kernelize
    with pytest.raises(ValueError, match=OFFLINE_ERROR):  # the native symptom
        _load(float_checkpoint)

    status = {s["name"]: s for s in shims.apply(only=["hub_kernels_offline"])}["hub_kernels_offline"]
    try:
        assert status["applied"], status
        caplog.set_level(logging.WARNING, logger="shims")
        model = _load(float_checkpoint)
        lines = [r for r in caplog.records if r.name == "shims"]
        assert len(lines) == 1 and OFFLINE_ERROR in lines[0].getMessage(), [r.getMessage() for r in lines]
        assert not model.use_kernels
        monkeypatch.setenv("USE_HUB_KERNELS", "0")  # the model as loaded without kernelization
        own = _load(float_checkpoint)
        assert torch.equal(_logits(model), _logits(own))
    finally:
        shims.restore()
    assert modeling_utils.kernelize is native_kernelize
    monkeypatch.delenv("USE_HUB_KERNELS")
    with pytest.raises(ValueError, match=OFFLINE_ERROR):  # restore() undid it
        _load(float_checkpoint)


def test_other_kernel_errors_propagate(float_checkpoint, offline_missing_kernel, monkeypatch):
    """Only the offline missing-kernel error is caught: another version in the cache (kernels: 'Version 4 not found,
    available versions: 1') and the same error with the hub flag off still raise."""
    from huggingface_hub.hf_api import GitRefInfo
    from kernels._internals import _versions

    import shims
    from shims.compat import hub_kernels_offline

    _requires_default_kernelization()
    shims.apply(only=["hub_kernels_offline"])
    try:
        with monkeypatch.context() as flag_off:  # the shim's reading of the flag only: kernels stays offline
            flag_off.setattr(hub_kernels_offline, "hub_offline", lambda: False)
            with pytest.raises(ValueError, match=OFFLINE_ERROR):
                _load(float_checkpoint)
        monkeypatch.setattr(_versions, "_get_available_versions_from_cache",
                            lambda repo_id: {1: GitRefInfo(name="v1", ref="v1", target_commit="0" * 40)})
        with pytest.raises(ValueError, match="Version 4 not found, available versions: 1"):
            _load(float_checkpoint)
    finally:
        shims.restore()


def test_not_needed_where_kernels_are_opt_in():
    import shims
    from shims.compat import hub_kernels_offline

    if hub_kernels_offline.kernelizes_by_default():
        pytest.skip("this transformers kernelizes by default (covered above)")
    status = {s["name"]: s for s in shims.apply(only=["hub_kernels_offline"])}["hub_kernels_offline"]
    shims.restore()
    assert not status["applied"]
    assert status["reason"] == ("not needed: from_pretrained does not kernelize unless asked (use_kernels defaults "
                                "off in this transformers)")
