"""The one list of patches, in the order they apply. Each concern module declares its own Patch records."""

from __future__ import annotations

from .registry import Registry


def all_patches() -> tuple:
    from .adapters import adapter_load
    from .compat import branch_dtype, causal_lm_backbone, hub_kernels_offline, moe_config_alias, moe_routing_dtype
    from .lora import fast_lora, peft_compat, peft_experts
    from .merging import merge
    from .quant import checkpoint, checkpoint_v4, loader_v5, quant_legacy, quant_router

    # loader_v5 ... quant_legacy: 4-bit experts and routers; the checkpoint patch wraps the loader outermost, so it
    # sees saved 4-bit tensors before the load-time quantizers do.
    return (tuple(loader_v5.PATCHES) + tuple(quant_router.PATCHES) + tuple(quant_legacy.PATCHES)
            + tuple(checkpoint.PATCHES) + tuple(checkpoint_v4.PATCHES) + tuple(peft_experts.PATCHES)
            + tuple(merge.PATCHES) + tuple(fast_lora.PATCHES) + tuple(peft_compat.PATCHES) + tuple(adapter_load.PATCHES)
            + tuple(moe_routing_dtype.PATCHES) + tuple(moe_config_alias.PATCHES) + tuple(causal_lm_backbone.PATCHES)
            + tuple(hub_kernels_offline.PATCHES) + tuple(branch_dtype.PATCHES))


def build_registry() -> Registry:
    return Registry(all_patches())
