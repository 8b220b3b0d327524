"""shims.loader_generation: which transformers loader is installed, named once for every patch declaration."""

from __future__ import annotations

import importlib.util

import pytest

from shims.quant.forward import PARAMETRIZE_CACHE_TARGETS
from shims.loader_generation import V4, V5, targets_for, transformers_loader
from shims.patches import all_patches
from shims.registry import Target

# The patches that install shim 4-bit tensors (whose forward toggles torch's parametrize cache), by loader.
FOUR_BIT_PATCHES = {"quantize_fused_experts": V5, "quantize_moe_routers": V5,
                    "prequantized_experts_checkpoint": V5, "quantize_fused_experts_v4": V4}


def test_detects_the_loader_the_patches_wrap():
    pytest.importorskip("transformers")
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    v5 = importlib.util.find_spec("transformers.core_model_loading") is not None
    v4 = hasattr(Bnb4BitHfQuantizer, "create_quantized_param")
    assert v5 != v4  # exactly one loader on every supported transformers
    assert transformers_loader() == (V5 if v5 else V4)


def test_targets_for_blocks_only_on_its_own_loader():
    required, optional = (Target("m", "a"),), (Target("m", "b"),)
    here = transformers_loader()
    other = V4 if here == V5 else V5
    assert targets_for(here, required, optional) == {"targets": required, "optional_targets": optional}
    assert targets_for(other, required, optional) == {"targets": (), "optional_targets": required + optional}


@pytest.mark.parametrize("name", sorted(FOUR_BIT_PATCHES))
def test_four_bit_patches_declare_the_parametrize_cache(name):
    patch = {p.name: p for p in all_patches()}[name]
    declared = patch.targets if transformers_loader() == FOUR_BIT_PATCHES[name] else patch.optional_targets
    assert set(PARAMETRIZE_CACHE_TARGETS) <= set(declared)


def test_parametrize_cache_state_exists_on_this_torch():
    pytest.importorskip("torch")
    assert {t.symbol: t.drift() for t in PARAMETRIZE_CACHE_TARGETS} == {
        "torch.nn.utils.parametrize._cache_enabled": "ok", "torch.nn.utils.parametrize._cache": "ok"}
