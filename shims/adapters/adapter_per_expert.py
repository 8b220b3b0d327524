"""Fused expert LoRA (transformers 5.x ``target_parameters``) -> per-expert LoRA modules (transformers 4.57 names).

transformers 4.57 keeps qwen3_moe / deepseek_v3 / glm4_moe experts as ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
and mixtral's as ``block_sparse_moe.experts.{e}.w1/w3/w2`` (w1 = gate, w3 = up, w2 = down): ``nn.Linear`` modules that
LoRA targets through ``target_modules``. SGLang and (for most archs) vLLM read the same per-expert names.

Expert e's fused LoRA (standard layout) is ``delta_e = B_e @ A_e`` with ``A_e (r, H)`` and ``B_e (2I, r)`` for
gate_up, whose rows 0:I are gate and I:2I up (transformers concatenates them). So gate and up share ``A_e`` and
take their halves of ``B_e``: ``gate: (B_e[:I], A_e)``, ``up: (B_e[I:], A_e)``, with the same rank and alpha, and
every expert delta is unchanged (a re-slicing, no arithmetic). down_proj's ``(A_e, B_e)`` is the per-expert pair as
it is. A "swapped" (peft 0.18) LoRA is first re-arranged to "standard" (:func:`swap_expert_factors`, exact).

gpt_oss is not converted: its experts are fused 3D parameters on transformers 4.57 too (``GptOssExperts``,
``gate_up_proj (E, H, 2I)`` with gate/up *interleaved*, columns ``[..., ::2]`` gate and ``[..., 1::2]`` up), so
there are no per-expert modules to target; engines that read gpt_oss expert LoRA read it fused
(``--to standard``).
"""

from __future__ import annotations

import re

from .adapter_convert import module_path, pattern_value, rank_for  # one rule for patterns, shared
from .lora_layout import SWAPPED, ExpertDims, expert_factors, swap_expert_factors

# transformers 4.57's per-expert names: (moe module, gate, up, down); every other arch uses _DEFAULT_NAMES
_NAMES_BY_MODEL_TYPE = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
_DEFAULT_NAMES = ("mlp", "gate_proj", "up_proj", "down_proj")
# experts that are fused 3D parameters on transformers 4.57 as well: no per-expert modules exist
FUSED_ON_V4 = frozenset({"gpt_oss"})


class PerExpertNotApplicable(ValueError):
    """The base model has no per-expert modules (gpt_oss), so a per-expert LoRA cannot exist for it."""


def per_expert_names(model_type: str | None) -> tuple[str, str, str, str]:
    """(moe module, gate, up, down) module names of transformers 4.57's per-expert experts for ``model_type``."""
    if model_type in FUSED_ON_V4:
        raise PerExpertNotApplicable(
            f"{model_type} experts are fused on transformers 4.57 too (3D gate_up_proj with gate/up interleaved: "
            "columns [..., ::2] gate, [..., 1::2] up): there are no per-expert modules; keep the fused LoRA and "
            "convert it with --to standard for engines that read fused expert LoRA (vLLM)")
    return _NAMES_BY_MODEL_TYPE.get(model_type, _DEFAULT_NAMES)


def split_fused_experts(tensors: dict, config: dict, found: dict, base: dict) -> tuple[dict, dict, dict]:
    """Per-expert LoRA tensors and adapter config from a fused adapter.

    ``found``: :func:`shims.adapters.adapter_convert.detect_adapter_layout`'s result (prefix -> ExpertLora); ``base``: the base
    model's config dict. Returns (tensors, adapter config, summary); the input dicts are not modified.
    """
    model_type = base.get("model_type")
    moe_name, gate, up, down = per_expert_names(model_type)
    dims = ExpertDims.from_config(base)
    fused_keys = _fused_keys(found)
    out = {k: v for k, v in tensors.items() if k not in fused_keys}  # attention etc. copied as they are
    scaling = {}  # per-expert module name -> (rank, alpha) of the fused LoRA it came from
    moe_modules = set()
    for prefix, info in found.items():
        lora_A, lora_B = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        if info.layout == SWAPPED:
            lora_A, lora_B = swap_expert_factors(lora_A, lora_B, dims.num_experts)
        moe = _moe_module(prefix, moe_name)
        moe_modules.add(moe)
        names = (gate, up) if info.param == "gate_up_proj" else (down,)
        rank_alpha = (rank_for(prefix, info.param, config), _alpha(prefix, info.param, config))
        if lora_A.shape[0] != rank_alpha[0] * dims.num_experts:
            raise ValueError(f"{prefix}: lora_A has {lora_A.shape[0]} rows, not r={rank_alpha[0]} x "
                             f"{dims.num_experts} experts of the base config")
        for name in names:
            scaling[name] = rank_alpha
        for e in range(dims.num_experts):
            for name, (a_e, b_e) in zip(names, _expert_pairs(lora_A, lora_B, dims, e, info.param)):
                key = f"{moe}.experts.{e}.{name}"
                # clones: safetensors refuses tensors that share storage (gate and up share A_e)
                out[f"{key}.lora_A.weight"] = a_e.clone()
                out[f"{key}.lora_B.weight"] = b_e.clone()
    new_config = _per_expert_config(config, moe_name, sorted(scaling), scaling, dims.num_experts)
    summary = {"per_expert_modules": len(moe_modules), "num_experts": dims.num_experts,
               "source_layouts": sorted({info.layout for info in found.values()}), "model_type": model_type}
    return out, new_config, summary


def _fused_keys(found) -> set[str]:
    return {f"{prefix}.lora_{ab}.weight" for prefix in found for ab in "AB"}


def _moe_module(prefix: str, moe_name: str) -> str:
    """``...layers.N.mlp.experts(.base_layer)*`` -> ``...layers.N.<moe_name>`` (mixtral: block_sparse_moe)."""
    experts = re.sub(r"(\.base_layer)+$", "", prefix)
    if not experts.endswith(".experts"):
        raise ValueError(f"{prefix}: not a fused experts LoRA (expected a key under '.experts')")
    parent, _, _ = experts[: -len(".experts")].rpartition(".")
    return f"{parent}.{moe_name}"


def _expert_pairs(lora_A, lora_B, dims: ExpertDims, expert: int, param: str):
    """Expert ``expert``'s (A, B) per output module: (gate, up) for gate_up_proj, (down,) for down_proj."""
    a_e, b_e = expert_factors(lora_A, lora_B, dims.num_experts, expert)
    if param == "down_proj":
        return ((a_e, b_e),)
    inter = dims.intermediate
    if b_e.shape[0] != 2 * inter:
        raise ValueError(f"gate_up LoRA B has {b_e.shape[0]} rows; expected 2 x intermediate = {2 * inter}")
    return (a_e, b_e[:inter]), (a_e, b_e[inter:])


def _alpha(prefix: str, param: str, config: dict):
    value = pattern_value(config.get("alpha_pattern") or {}, f"{module_path(prefix)}.{param}")
    return value if value is not None else config["lora_alpha"]


def _per_expert_config(config: dict, moe_name: str, names: list[str], scaling: dict, num_experts: int) -> dict:
    """adapter_config.json for the per-expert adapter: target_modules gains the per-expert modules (by their full
    ``<moe>.experts.{e}.<name>`` suffix, so a shared expert's or a dense MLP's gate_proj is not caught),
    target_parameters is dropped, and rank/alpha patterns keep each expert LoRA's scaling."""
    new = {k: v for k, v in config.items() if k != "target_parameters"}
    suffixes = [f"{moe_name}.experts.{e}.{name}" for e in range(num_experts) for name in names]
    modules = config.get("target_modules")
    if isinstance(modules, str):
        alternatives = "|".join(re.escape(n) for n in names)
        new["target_modules"] = rf"(?:{modules})|(?:.*\.{re.escape(moe_name)}\.experts\.\d+\.(?:{alternatives}))"
    else:
        new["target_modules"] = sorted(set(modules or ()) | set(suffixes))
    rank_pattern, alpha_pattern = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for name, (rank, alpha) in scaling.items():
        key = rf"{re.escape(moe_name)}\.experts\.\d+\.{re.escape(name)}"
        if rank != config["r"]:
            rank_pattern[key] = rank
        if alpha != config["lora_alpha"]:
            alpha_pattern[key] = alpha
    new["rank_pattern"], new["alpha_pattern"] = rank_pattern, alpha_pattern
    _check_scaling(new, suffixes, scaling)
    return new


def _check_scaling(config: dict, suffixes: list[str], scaling: dict) -> None:
    """peft resolves rank/alpha per module by the first matching pattern key (in the file's key order, which
    write_json sorts): make sure every per-expert module gets the rank and alpha its fused LoRA had, or refuse
    rather than write an adapter that loads with a silently different scaling."""
    for suffix in suffixes:
        name = suffix.rsplit(".", 1)[-1]
        key = f"model.layers.0.{suffix}"
        rank = pattern_value(dict(sorted(config["rank_pattern"].items())), key)
        alpha = pattern_value(dict(sorted(config["alpha_pattern"].items())), key)
        got = (config["r"] if rank is None else rank, config["lora_alpha"] if alpha is None else alpha)
        if got != scaling[name]:
            raise ValueError(f"rank_pattern/alpha_pattern give {suffix} (rank, alpha) = {got}, but its fused LoRA "
                             f"had {scaling[name]}; rewrite the patterns so they do not also match per-expert names")
