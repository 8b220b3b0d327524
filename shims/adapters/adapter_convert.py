"""Saved adapter folders with expert LoRAs: which layout each expert LoRA is in, and conversion between layouts
(and from transformers 4.x per-expert LoRAs to 5.x fused ones). The convention itself: shims.adapters.lora_layout.

Our own record of what a converted adapter holds (``moe_shims_layout.json``) is trusted first when reading one back.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .base_config import load_base_config
from ..files import read_json, refuse_existing, staged_dir, write_json
from .lora_layout import (
    LAYOUTS,
    STANDARD,
    SWAPPED,
    AmbiguousLayoutError,
    ExpertDims,
    layout_from_peft_version,
    layout_from_shapes,
    stack_expert_factors,
    swap_expert_factors,
)

log = logging.getLogger("shims")

FUSED = "fused"  # convert_adapter's third target: transformers 4.x per-expert LoRAs -> 5.x fused ones
PER_EXPERT = "per_expert"  # and the reverse: 5.x fused expert LoRA -> 4.57 per-expert modules (adapter_per_expert)
CONVERSION_TARGETS = (STANDARD, SWAPPED, FUSED, PER_EXPERT)

# Our own record of what a converted adapter holds; peft ignores extra files in an adapter folder.
LAYOUT_RECORD = "moe_shims_layout.json"

_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # registration order in every experts module
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ExpertLora:
    """One expert-parameter LoRA in a saved adapter."""

    prefix: str       # key up to (not including) ".lora_A.weight"
    param: str        # gate_up_proj / down_proj
    a_shape: tuple
    b_shape: tuple
    layout: str


def detect_adapter_layout(adapter_dir, base_config=None) -> dict[str, ExpertLora]:
    """Per expert-parameter LoRA of a saved adapter: which layout it is in.

    Evidence, strongest first: our own conversion record; the ``peft_version`` that wrote it; the shapes
    against the base model's expert dims (``base_config``: a transformers config, a dict, or a folder with a
    config.json; falls back to the adapter's ``base_model_name_or_path`` when that is a local folder).
    Raises AmbiguousLayoutError when nothing tells, ValueError when evidence disagrees.
    """
    adapter_dir = Path(adapter_dir)
    config = read_json(adapter_dir / _ADAPTER_CONFIG)
    tensors = read_tensors(adapter_dir)
    dims = _expert_dims(base_config, config)
    recorded = _read_layout_record(adapter_dir)
    out = {}
    for prefix, param in _expert_lora_prefixes(tensors, config):
        a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
        is_transposed = dims.is_transposed if dims else None
        # Whether the writer's experts module declared is_transposed is unknown (the adapter does not record its
        # transformers), so for (E, in, out) experts only peft 0.18's version tells; the shapes must decide 0.19+.
        by_version = recorded or layout_from_peft_version(config.get("peft_version"), is_transposed,
                                                          declares_transposed=None)
        by_shape = None
        if dims is not None:
            d1, d2 = dims.param_shape(param)
            try:
                by_shape = layout_from_shapes(a.shape[1], b.shape[0], d1, d2, dims.is_transposed)
            except AmbiguousLayoutError:
                by_shape = None
        if by_version and by_shape and by_version != by_shape:
            raise ValueError(f"{prefix}: peft_version {config.get('peft_version')} implies {by_version} but the "
                             f"shapes say {by_shape}")
        layout = by_version or by_shape
        if layout is None:
            why = "; for (E, in, out) experts peft 0.19+'s layout depends on the transformers that wrote it" \
                if is_transposed else ""
            raise AmbiguousLayoutError(
                f"{prefix} ({param}): cannot tell 'standard' from 'swapped' (peft_version="
                f"{config.get('peft_version')!r}, base config {'given' if dims else 'unknown'}{why}); pass base_config "
                "with non-square expert dims or convert with the live model")
        out[prefix] = ExpertLora(prefix, param, tuple(a.shape), tuple(b.shape), layout)
    return out


def _expert_lora_prefixes(tensors, config):
    """(key prefix, parameter name) for every fused-expert LoRA in an adapter state dict.

    Several target_parameters on one module nest ParamWrappers: the innermost (most ".base_layer") wraps the
    parameter registered first (gate_up_proj), the outer ones the later ones.
    """
    targets = [t.rsplit(".", 1)[-1] for t in (config.get("target_parameters") or [])]
    wanted = [p for p in _EXPERT_PARAMS if p in targets]
    unknown = sorted(set(targets) - set(_EXPERT_PARAMS))
    if unknown:
        raise ValueError(f"target_parameters {unknown} are not expert parameters this tool knows")
    by_module: dict[str, list[str]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        module = re.sub(r"(\.base_layer)+$", "", prefix)
        if module.rsplit(".", 1)[-1] != "experts" or not wanted:
            continue
        by_module.setdefault(module, []).append(prefix)
    for module, prefixes in by_module.items():
        if len(prefixes) != len(wanted):
            raise ValueError(f"{module}: {len(prefixes)} expert LoRAs for target_parameters {wanted}")
        deepest_first = sorted(prefixes, key=lambda p: -p.count(".base_layer"))
        yield from zip(deepest_first, wanted)


def _expert_dims(base_config, adapter_config) -> ExpertDims | None:
    # a base_config the caller names must be found; the adapter's own record of its base is only a hint
    config = load_base_config(base_config, adapter_config, required=base_config is not None)
    return None if config is None else ExpertDims.from_config(config)


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def convert_adapter(src_dir, dst_dir, to: str, base_config=None, layout: str = STANDARD,
                    overwrite: bool = False) -> dict:
    """Convert a saved LoRA adapter's expert weights; write ``dst_dir`` atomically. Returns a summary dict.

    to="standard" / "swapped": re-arrange every fused-expert LoRA into that layout (peft 0.19.1+ / 0.18)
        with :func:`swap_expert_factors`; the delta of every expert is unchanged (exact, a permutation).
    to="fused": turn a transformers 4.57 per-expert adapter (``experts.{e}.gate_proj/up_proj/down_proj``,
        mixtral ``w1/w3/w2``, LoRA via target_modules) into a 5.x ``target_parameters`` adapter on the fused
        ``gate_up_proj`` / ``down_proj`` in ``layout``. gate_up gets rank **2r**: ``A_e = [A_gate; A_up]``
        (2r, H) and ``B_e = blockdiag(B_gate, B_up)`` (2I, 2r) hold the two factors separately and exactly.
        To keep ``alpha / r`` (or ``alpha / sqrt(r)`` with rslora) unchanged the config records
        ``rank_pattern`` and ``alpha_pattern`` for ``.*\\.gate_up_proj`` -- the same entries peft's own v4->v5
        remap writes. Mixtral's ``block_sparse_moe`` becomes ``mlp``. Non-expert LoRAs are copied unchanged.
    to="per_expert": the reverse for a 5.x fused adapter of either layout: per-expert LoRA modules under
        transformers 4.57's names (``mlp.experts.{e}.gate_proj/up_proj/down_proj``, mixtral
        ``block_sparse_moe.experts.{e}.w1/w3/w2``), every expert delta unchanged, loadable by peft on 4.57 and read
        by engines that want per-expert LoRA; see :mod:`shims.adapters.adapter_per_expert` (gpt_oss has no per-expert
        modules and is refused). Needs the base config (model type, expert dims): ``base_config`` or the adapter's
        ``base_model_name_or_path`` (a local folder, or a hub id in the local Hugging Face cache).

    Which layout a given peft and transformers expect: :func:`shims.adapters.lora_layout.expected_layout`. The written adapter_config.json's
    ``peft_version`` names a peft release whose convention implies ``layout`` for these experts (so that
    version-based readers do not contradict it); the original version and what was done are kept in
    ``moe_shims_layout.json``, which is what this module trusts first.
    """
    if to not in CONVERSION_TARGETS:
        raise ValueError(f"to must be one of {', '.join(map(repr, CONVERSION_TARGETS))}, not {to!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'standard' or 'swapped', not {layout!r}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / _ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{src_dir} has no {_ADAPTER_CONFIG}: not a saved peft adapter")
    refuse_existing(dst_dir, overwrite)
    config = read_json(src_dir / _ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters are supported, not {config.get('peft_type')}")
    tensors = read_tensors(src_dir)
    if to == PER_EXPERT:
        return _convert_to_per_expert(src_dir, dst_dir, tensors, config, base_config, overwrite)
    if to == FUSED:
        tensors, config, summary = _fuse_per_expert(tensors, config, layout)
    else:
        tensors, config, summary = _relayout(src_dir, tensors, config, to, base_config)
        layout = to
    record = {"expert_layout": layout, "source_peft_version": config.get("peft_version"), **summary}
    config["peft_version"] = _peft_version_writing(layout, summary.get("experts_transposed"))
    _write_adapter(src_dir, dst_dir, tensors, config, record, overwrite)
    return record


def _convert_to_per_expert(src_dir, dst_dir, tensors, config, base_config, overwrite) -> dict:
    from .adapter_per_expert import split_fused_experts

    base = load_base_config(base_config, config, required=True)  # model type and expert dims are needed
    found = detect_adapter_layout(src_dir, base)
    if not found:
        raise ValueError(f"{src_dir} has no fused-expert LoRA (target_parameters) to split per expert")
    tensors, new_config, summary = split_fused_experts(tensors, config, found, base)
    # per-expert LoRAs are plain Linear LoRAs, the same in every peft version: peft_version stays what wrote it
    record = {"expert_layout": PER_EXPERT, "source_peft_version": config.get("peft_version"), **summary}
    _write_adapter(src_dir, dst_dir, tensors, new_config, record, overwrite)
    return record


def _peft_version_writing(layout: str, is_transposed: bool | None) -> str:
    """A peft release whose rule gives ``layout`` (or nothing) under :func:`layout_from_peft_version`.

    For (E, out, in) experts 0.19.1 writes "standard" and 0.18 "swapped". For (E, in, out) experts 0.18 writes
    "standard" on every transformers; "swapped" is what 0.19.1 writes on 4.57, and 0.19.1 is read as "unknown"
    there, so the shapes or our record decide. Orientation unknown (converted from our record alone): the
    (E, out, in) names; the record stays authoritative.
    """
    if is_transposed:
        return "0.18.1" if layout == STANDARD else "0.19.1"
    return "0.19.1" if layout == STANDARD else "0.18.1"


def _relayout(src_dir, tensors, config, to, base_config):
    dims = _expert_dims(base_config, config)
    found = detect_adapter_layout(src_dir, base_config)
    if not found:
        raise ValueError(f"{src_dir} has no fused-expert LoRA (target_parameters) to convert")
    converted = 0
    for prefix, info in found.items():
        if info.layout == to:
            continue
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        experts = _num_experts_of(prefix, info, config)
        tensors[a_key], tensors[b_key] = swap_expert_factors(tensors[a_key], tensors[b_key], experts)
        converted += 1
    return tensors, dict(config), {"converted": converted, "expert_loras": len(found),
                                   "experts_transposed": dims.is_transposed if dims else None}


def _num_experts_of(prefix, info, config) -> int:
    rank = rank_for(prefix, info.param, config)
    if info.a_shape[0] % rank:
        raise ValueError(f"{prefix}: lora_A rows {info.a_shape[0]} not a multiple of r={rank}")
    return info.a_shape[0] // rank


def rank_for(prefix, param, config) -> int:
    from_pattern = pattern_value(config.get("rank_pattern") or {}, f"{module_path(prefix)}.{param}")
    return int(from_pattern if from_pattern is not None else config["r"])


def pattern_value(patterns: dict, key: str):
    # the same rule as peft.utils.other.get_pattern_key
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return None


def module_path(prefix: str) -> str:
    path = re.sub(r"(\.base_layer)+$", "", prefix)
    return path.removeprefix("base_model.model.")


PER_EXPERT_KEY = re.compile(
    r"^(?P<moe>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.lora_(?P<ab>[AB])\.weight$")
_GATE, _UP, _DOWN = "gate", "up", "down"
_PROJ_ROLE = {"gate_proj": _GATE, "w1": _GATE, "up_proj": _UP, "w3": _UP, "down_proj": _DOWN, "w2": _DOWN}
_PER_EXPERT_MODULE_NAMES = frozenset(_PROJ_ROLE)


def _fuse_per_expert(tensors, config, layout):
    import torch

    if config.get("target_parameters"):
        raise ValueError("adapter already targets parameters (fused experts); nothing to fuse")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise NotImplementedError("per-module rank_pattern/alpha_pattern are not converted; the fused rank and "
                                  "alpha would have to be rebuilt per module")
    groups: dict[str, dict[str, dict[int, dict[str, torch.Tensor]]]] = {}
    rest = {}
    for key, value in tensors.items():
        m = PER_EXPERT_KEY.match(key)
        if m is None:
            rest[key] = value
            continue
        moe = m["moe"].replace(".block_sparse_moe", ".mlp")  # mixtral's 5.x module name
        role = _PROJ_ROLE[m["proj"]]
        groups.setdefault(moe, {}).setdefault(role, {}).setdefault(int(m["e"]), {})[m["ab"]] = value
    if not groups:
        raise ValueError("no per-expert LoRA keys (experts.N.gate_proj/up_proj/down_proj or w1/w3/w2) found")

    r, alpha = int(config["r"]), config["lora_alpha"]
    fused_params = set()
    out = dict(rest)
    for moe, roles in groups.items():
        params = _fused_params_of(moe, roles)
        fused_params.update(params)
        for depth, param in enumerate(reversed(params)):
            prefix = f"{moe}.experts" + ".base_layer" * depth
            factors = _fused_factors(moe, roles, param)
            lora_A, lora_B = stack_expert_factors(factors)
            if layout == SWAPPED:
                lora_A, lora_B = swap_expert_factors(lora_A, lora_B, len(factors))
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = lora_A, lora_B

    config = dict(config)
    modules = config.get("target_modules")
    if isinstance(modules, str):
        config["target_modules"] = _regex_for_fused(modules, groups)
    else:
        config["target_modules"] = sorted(set(modules or ()) - _PER_EXPERT_MODULE_NAMES) or None
    if any(".shared_expert" in k or ".mlp.gate_proj" in k for k in rest):
        log.warning("shims: adapter also targets shared/dense MLP gate/up/down modules; their target_modules "
                    "names were removed and those LoRAs will not load on 5.x")
    config["target_parameters"] = [p for p in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
                                   if p.rsplit(".", 1)[-1] in fused_params]
    if "gate_up_proj" in fused_params:
        fused_alpha = alpha * (math.sqrt(2) if config.get("use_rslora") else 2)
        config["rank_pattern"] = {r".*\.gate_up_proj": 2 * r}
        config["alpha_pattern"] = {r".*\.gate_up_proj": fused_alpha}
    return out, config, {"fused_modules": len(groups), "fused_params": sorted(fused_params),
                         "gate_up_rank": 2 * r if "gate_up_proj" in fused_params else None}


def _regex_for_fused(pattern: str, groups) -> str:
    """A regex target_modules carries over unchanged: on 5.x its per-expert alternatives match no module (the
    experts are fused parameters now, targeted by target_parameters) and the rest match as before. It must not
    match the fused experts module itself, which is not a Linear; "all-linear" is resolved by peft per version
    and cannot be carried over faithfully."""
    if pattern == "all-linear":
        raise ValueError("target_modules='all-linear' cannot be carried over to fused experts: peft resolves it "
                         "differently per version; list the modules instead")

    for moe in groups:
        if re.fullmatch(pattern, f"{moe}.experts"):
            raise ValueError(f"target_modules regex {pattern!r} matches the fused experts module {moe}.experts, "
                             "which LoRA cannot wrap on transformers 5.x")
    return pattern


def _fused_params_of(moe, roles):
    has_gate, has_up = _GATE in roles, _UP in roles
    if has_gate != has_up:
        raise ValueError(f"{moe}: gate and up projections are fused into gate_up_proj; the adapter targets only "
                         f"{'gate' if has_gate else 'up'}")
    return [p for p, present in (("gate_up_proj", has_gate), ("down_proj", _DOWN in roles)) if present]


def _fused_factors(moe, roles, param):
    import torch

    def complete(role):
        experts = roles[role]
        if sorted(experts) != list(range(len(experts))) or any(set(ab) != {"A", "B"} for ab in experts.values()):
            raise ValueError(f"{moe}: {role} LoRA missing for some experts or factors")
        return [(experts[e]["A"], experts[e]["B"]) for e in range(len(experts))]

    if param == "down_proj":
        return complete(_DOWN)
    gates, ups = complete(_GATE), complete(_UP)
    if len(gates) != len(ups):
        raise ValueError(f"{moe}: {len(gates)} gate but {len(ups)} up expert LoRAs")
    # rows 0:I of gate_up_proj are gate, I:2I up (transformers concatenates gate then up)
    return [(torch.cat([ga, ua], dim=0), torch.block_diag(gb, ub)) for (ga, gb), (ua, ub) in zip(gates, ups)]


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def _read_layout_record(adapter_dir: Path) -> str | None:
    path = adapter_dir / LAYOUT_RECORD
    return read_json(path).get("expert_layout") if path.is_file() else None


def read_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = adapter_dir / _ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {_ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    return load_file(str(path))


def _write_adapter(src_dir: Path, dst_dir: Path, tensors, config, record, overwrite: bool) -> None:
    """Write the converted adapter into a temp folder next to ``dst_dir`` and rename it into place (old content
    kept on failure); files other than the weights, config and record (README, tokenizer ...) are copied over."""
    from safetensors.torch import save_file

    with staged_dir(dst_dir, overwrite) as tmp:
        for extra in src_dir.iterdir():
            if extra.is_file() and extra.name not in (_ADAPTER_WEIGHTS, _ADAPTER_CONFIG, LAYOUT_RECORD):
                shutil.copy2(extra, tmp / extra.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        write_json(tmp / _ADAPTER_CONFIG, config)
        write_json(tmp / LAYOUT_RECORD, record)
