"""hub_kernels_offline: ``from_pretrained`` offline with a hub kernel that is not in the local cache.

transformers 5.25 kernelizes every model at the end of ``from_pretrained`` by default (``use_kernels`` unset means
on, unless ``USE_HUB_KERNELS`` says no): ``set_use_kernels`` calls ``modeling_utils.kernelize``, which hands the model
to the ``kernels`` library with transformers' default mapping (RMSNorm -> ``kernels-community/liger-kernels`` v4,
activations, rotary, on CUDA / ROCm / XPU). With the hub offline, ``kernels`` resolves a kernel's version from the
local cache only, and a kernel that was never downloaded raises ``ValueError: Version 4 of
'kernels-community/liger-kernels' is not available in the local cache and Hugging Face Hub is in offline mode``
(``kernels``' own load fallback catches ``FileNotFoundError`` only). The load fails although the model's own layers
would run.

The patch wraps ``modeling_utils.kernelize``, the one call that raises it, and catches only that error, only when
``huggingface_hub``'s offline flag (the flag ``kernels`` reads) is set: the model is reset to its own layers with
its ``reset_kernels()`` (an empty mapping, nothing loaded, ``use_kernels`` False) and one warning line says so.
Nothing is fetched: offline, nothing can be. Needed where ``from_pretrained`` turns an unset ``use_kernels`` into
True (read from its source); before 5.25 kernels were opt-in.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import inspect
import logging
import re

from ..registry import Patch, Target, chain_undo, present_holders, swap_attr

log = logging.getLogger("shims")

KERNELIZE = Target("transformers.modeling_utils", "kernelize", ("model",))
RESET = Target("transformers.modeling_utils", "PreTrainedModel.reset_kernels")
FROM_PRETRAINED = Target("transformers.modeling_utils", "PreTrainedModel.from_pretrained")

# The two ways kernels says "this kernel is not in the local cache and the hub is offline" (a version: v4 of a
# community kernel; a revision: a pinned repo such as biohub's), read from kernels 0.19.1's _versions.py.
_OFFLINE_MISSING = re.compile(r"not (?:available )?in the local cache and Hugging Face Hub is in offline mode")
# from_pretrained's source turning a use_kernels the caller did not pass into True (5.25: `elif use_kernels is None:
# use_kernels = True`); before, `kwargs.pop("use_kernels", False)`
_DEFAULT_ON = re.compile(r"use_kernels\s+is\s+None\s*:\s*\n\s*use_kernels\s*=\s*True")
_RESETTING = contextvars.ContextVar("shims_hub_kernels_resetting", default=False)


def kernelizes_by_default() -> bool:
    """Whether the installed ``PreTrainedModel.from_pretrained`` kernelizes when the caller passes no use_kernels."""
    try:
        source = inspect.getsource(FROM_PRETRAINED.resolve())
    except (LookupError, OSError, TypeError):
        return False
    return _DEFAULT_ON.search(source) is not None


def hub_offline() -> bool:
    """huggingface_hub's offline flag, read at call time: the value kernels passes as ``local_files_only``."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_offline_missing_kernel(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and _OFFLINE_MISSING.search(str(exc)) is not None


def _needed() -> str | None:
    if not kernelizes_by_default():
        return "from_pretrained does not kernelize unless asked (use_kernels defaults off in this transformers)"
    if importlib.util.find_spec("kernels") is None:
        return "the kernels library is not installed: from_pretrained loads no hub kernel"
    missing = [t.symbol for t in (KERNELIZE, RESET) if not list(present_holders((t,)))]
    if missing:
        return f"this transformers has no {', '.join(missing)}"
    return None


def _own_layers(model, exc: ValueError) -> None:
    """Put every kernelizable layer of ``model`` back on its own forward, and say why, once."""
    token = _RESETTING.set(True)
    try:
        model.reset_kernels()  # an empty mapping: loads nothing, sets use_kernels False
    finally:
        _RESETTING.reset(token)
    log.warning("hub kernels offline: %s; %s runs its own layers (set USE_HUB_KERNELS=0 to skip kernelization)",
                str(exc).split(". ")[0], type(model).__name__)


def _install():
    holder, name = KERNELIZE.locate()
    original = getattr(holder, name)

    @functools.wraps(original)
    def kernelize(model, *args, **kwargs):
        try:
            return original(model, *args, **kwargs)
        except ValueError as exc:
            # only the offline missing-kernel error, and not while resetting (that would recurse)
            if _RESETTING.get() or not (hub_offline() and is_offline_missing_kernel(exc)):
                raise
            _own_layers(model, exc)

    return chain_undo([swap_attr(holder, name, kernelize)])


PATCHES = (
    Patch(
        name="hub_kernels_offline",
        summary="from_pretrained offline with a default hub kernel missing from the local cache (transformers 5.25 "
                "kernelizes by default): the model keeps its own layers, one warning, nothing fetched",
        targets=(),
        # Optional: before transformers 5.25 there is no default kernelization; needed() says so.
        optional_targets=(KERNELIZE, RESET, FROM_PRETRAINED),
        needed=_needed,
        install=_install,
    ),
)
