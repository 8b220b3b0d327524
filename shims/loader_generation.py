"""Which transformers checkpoint loader is installed: the one fact every 4-bit patch declaration depends on.

transformers has had two loaders, and each shim that stores tensors in 4 bits hooks exactly one of them:

- ``"v5"``: transformers >= 5 reads checkpoints through ``transformers.core_model_loading``
  (``set_param_for_module``, ``WeightConverter`` chains), with fused 3D experts on every MoE architecture;
- ``"v4"``: transformers 4.x hands each tensor the bnb quantizer claims to ``create_quantized_param``; most MoE
  experts are per-expert ``nn.Linear`` there (bitsandbytes quantizes them natively), a few are already fused
  (gpt_oss), so "has fused experts" is NOT the same question as "which loader".

Both are detected by feature, not by version number: what is detected is the very module or method the patches
wrap, so a release that moves it is reported as "not needed / drift" by the registry instead of being misread.
"""

from __future__ import annotations

import functools
import importlib.util

from .registry import Target

V5 = "v5"
V4 = "v4"


@functools.lru_cache(maxsize=None)
def transformers_loader() -> str | None:
    """``"v5"``, ``"v4"`` or None (transformers not installed, or neither loader recognised)."""
    if _module_exists("transformers.core_model_loading"):
        return V5
    if _bnb_quantizer_creates_params():
        return V4
    return None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken installation
        return False


def _bnb_quantizer_creates_params() -> bool:
    # The 4.x bnb quantizer loads tensor by tensor through create_quantized_param (gone in 5.x).
    if not _module_exists("transformers.quantizers.quantizer_bnb_4bit"):
        return False
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    return hasattr(Bnb4BitHfQuantizer, "create_quantized_param")


def targets_for(loader: str, required: tuple[Target, ...], optional: tuple[Target, ...] = ()) -> dict:
    """A Patch's ``targets`` / ``optional_targets`` for a patch that hooks ``loader``.

    Where that loader is installed, ``required`` block the patch when they drift. Elsewhere the symbols do not exist
    and the patch is simply not needed: they are still drift-checked and reported, as optional, so that status()
    says "not needed" rather than "drift". Use as ``Patch(..., **targets_for(V5, required, optional))``.
    """
    if transformers_loader() == loader:
        return {"targets": tuple(required), "optional_targets": tuple(optional)}
    return {"targets": (), "optional_targets": tuple(required) + tuple(optional)}
