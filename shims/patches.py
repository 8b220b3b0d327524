"""The one list of patches, in the order they apply. Each concern module declares its own Patch records."""

from __future__ import annotations

from .registry import Registry


def all_patches() -> tuple:
    from . import checkpoint, fast_lora, merge, peft_compat, peft_experts, quant, quant_legacy

    return (tuple(quant.PATCHES) + tuple(quant_legacy.PATCHES) + tuple(checkpoint.PATCHES)
            + tuple(peft_experts.PATCHES) + tuple(merge.PATCHES)
            + tuple(fast_lora.PATCHES)  # quant/quant_legacy/checkpoint/peft_experts/merge/fast_lora: 4-bit experts
            + tuple(peft_compat.PATCHES))


def build_registry() -> Registry:
    return Registry(all_patches())
