"""Deliberately broken shims, to prove the harness sees each break (a mutation check).

MOE_SHIMS_MUTATION=<name> (set by `nox -s mutations` and the tests) is read by cases/run_cell.py before
shims.apply(). Each mutation plants one realistic bug; the harness passes the check when the affected cases
turn red. This lives in cases/, not in the shims package: the product has no test switches.
"""

from __future__ import annotations

import os

MUTATION_ENV = "MOE_SHIMS_MUTATION"


def _export_contiguous_lora_b() -> None:
    """The known upstream merge bug: per-expert lora_B sliced contiguously (B[:, e*r:(e+1)*r]) instead of
    peft's (out, r, E) convention (B[:, e::E])."""
    import torch

    from shims.merging import export

    original = export._float32_delta

    def broken(wrapper, adapter, experts=None):
        if type(wrapper).__name__ != "ParamWrapper" or wrapper.num_experts == 1:
            return original(wrapper, adapter, experts)
        A = wrapper.lora_A[adapter].weight.float()
        B = wrapper.lora_B[adapter].weight.float()
        E = wrapper.num_experts
        r = A.shape[0] // E
        per_expert = [B[:, e * r:(e + 1) * r] @ A[e * r:(e + 1) * r] for e in range(E)]
        delta = torch.stack(per_expert) * wrapper.scaling[adapter]  # (E, out, in) in peft's naming
        if not wrapper._did_swap_in_out_features:
            delta = delta.transpose(1, 2)
        return delta if experts is None else delta[experts[0]:experts[1]]  # export merges a few experts at a time

    export._float32_delta = broken


def _fast_lora_contiguous_lora_b() -> None:
    """The same slicing bug in the fast expert-LoRA path (shims.lora.fast_lora): expert e's lora_B columns taken as
    B[:, e*r:(e+1)*r] instead of B[:, e::E], in the per-expert loop and the grouped kernel's factor stacks. Training
    still runs and the expert LoRA still moves; only the fast path's logits differ from peft's own path."""
    from shims.lora import fast_lora  # _lora_term / _grouped_lora_term look both up here on every call

    from shims.adapters.lora_layout import did_swap_in_out_features

    def factors(wrapper, adapter, expert):
        A, B, E = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, wrapper.num_experts
        r = A.shape[0] // E
        a_e, b_e = A[expert * r:(expert + 1) * r], B[:, expert * r:(expert + 1) * r]
        if did_swap_in_out_features(wrapper):
            return b_e, a_e, wrapper.scaling[adapter]
        return a_e.t(), b_e.t(), wrapper.scaling[adapter]

    def factor_stacks(wrapper, adapter, dtype):
        A, B = wrapper.lora_A[adapter].weight.to(dtype), wrapper.lora_B[adapter].weight.to(dtype)
        E = wrapper.num_experts
        r = A.shape[0] // E
        a = A.reshape(E, r, A.shape[1])
        b = B.reshape(B.shape[0], E, r).permute(1, 0, 2)  # b[e] = B[:, e*r:(e+1)*r]
        if did_swap_in_out_features(wrapper):
            return b, a, wrapper.scaling[adapter]
        return a.transpose(1, 2), b.transpose(1, 2), wrapper.scaling[adapter]

    fast_lora._factors, fast_lora._factor_stacks = factors, factor_stacks


def _export_expert_delta_dropped() -> None:
    """The merged export leaves one expert's LoRA delta out (expert 1 of every fused experts stack): every tensor is
    written, well formed and counted as merged; only that expert serves its pre-training weights."""
    from shims.merging import export

    original = export._float32_delta

    def dropped(wrapper, adapter, experts=None):
        delta = original(wrapper, adapter, experts)
        first = 0 if experts is None else experts[0]
        if type(wrapper).__name__ == "ParamWrapper" and wrapper.num_experts > 1 and first <= 1 < first + len(delta):
            delta = delta.clone()
            delta[1 - first] = 0
        return delta

    export._float32_delta = dropped


def _quantize_noop() -> None:
    """Expert quantization silently does nothing (the upstream failure mode the shim exists to fix)."""
    from shims.quant import storage  # the loaders look the function up here on every call

    storage.quantize_expert_param = lambda *args, **kwargs: None


def _expert_family_skipped() -> None:
    """Structure detection forgets one family of expert tensor names (down_proj): those stacks are not seen as
    expert stacks, so modules holding them are not quantized as a whole (the silent float experts the shims exist
    to prevent)."""
    from shims.quant import storage  # read at call time by the structure walk and the loaders

    original = storage.candidate_stacks
    storage.candidate_stacks = lambda module: tuple(n for n in original(module) if n != "down_proj")


def _recipe_dtype_uncast() -> None:
    """Modules holding shim 4-bit tensors no longer cast float32 hidden states to their compute dtype: the QLoRA
    recipe's first step fails in a 4-bit router (the bug of shims 0.3.0)."""
    from shims.quant import forward

    forward._cast_input = lambda args, kwargs, dtype: (args, kwargs, None)


def _fuse_swapped_experts() -> None:
    """Fusing a 4.x checkpoint's per-expert 4-bit tensors puts expert 1's bytes where expert 0's belong (and the
    reverse): every tensor is still 4-bit and well formed, only the wrong expert answers."""
    from shims.quant import checkpoint_v4  # the loader looks the function up here on every call

    original = checkpoint_v4.fuse_per_expert_quant_states

    def swapped(parts):
        return original([[part[1], part[0], *part[2:]] if len(part) > 1 else part for part in parts])

    checkpoint_v4.fuse_per_expert_quant_states = swapped


def _per_expert_gate_up_swapped() -> None:
    """Splitting a fused gate_up LoRA into per-expert modules hands gate's half of each expert's B to up_proj and
    up's half to gate_proj: every tensor keeps its shape and the adapter loads, only the wrong projection moves."""
    from shims.adapters import adapter_per_expert  # split_fused_experts looks the function up here on every call

    original = adapter_per_expert._expert_pairs

    def swapped(*args, **kwargs):
        pairs = original(*args, **kwargs)
        return pairs[::-1] if len(pairs) == 2 else pairs

    adapter_per_expert._expert_pairs = swapped


def _skip(patch_name: str):
    def mutate() -> None:
        import shims

        names = [s["name"] for s in shims.status()]
        if patch_name not in names:
            raise ValueError(f"{MUTATION_ENV}: no shim named {patch_name!r}; known: {', '.join(names)}")
        os.environ["MOE_SHIMS_ONLY"] = ",".join(n for n in names if n != patch_name)
    return mutate


MUTATIONS = {
    "export_contiguous_lora_b": _export_contiguous_lora_b,
    "export_expert_delta_dropped": _export_expert_delta_dropped,
    "quantize_noop": _quantize_noop,
    "fast_lora_contiguous_lora_b": _fast_lora_contiguous_lora_b,
    "expert_family_skipped": _expert_family_skipped,
    "recipe_dtype_uncast": _recipe_dtype_uncast,
    "fuse_swapped_experts": _fuse_swapped_experts,
    "per_expert_gate_up_swapped": _per_expert_gate_up_swapped,
}


def plant_from_env() -> str | None:
    """Plant the mutation named in the environment, if any; return its name."""
    name = os.environ.get(MUTATION_ENV)
    if not name:
        return None
    if name.startswith("skip:"):
        _skip(name.split(":", 1)[1])()
    elif name in MUTATIONS:
        MUTATIONS[name]()
    else:
        known = ", ".join([*MUTATIONS, "skip:<shim name>"])
        raise ValueError(f"{MUTATION_ENV}: unknown mutation {name!r}; known: {known}")
    return name


def only_from_env() -> list[str] | None:
    value = os.environ.get("MOE_SHIMS_ONLY")
    return value.split(",") if value else None
