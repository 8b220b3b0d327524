"""Expert LoRA layouts: detection, peft's per-expert delta convention, and saved-adapter conversion.

A LoRA on a fused expert parameter ``W`` of shape ``(E, d1, d2)`` is stored by peft's ``ParamWrapper`` as
``lora_A`` ``(E*r, a_in)`` and ``lora_B`` ``(b_out, E*r)``. Two arrangements exist:

``"standard"``  lora_A acts on the parameter's *input* features (ordinary LoRA: ``delta_e = B_e @ A_e`` with
                ``A_e (r, in)``, ``B_e (out, r)``). peft >= 0.19.1 writes this for every expert parameter on
                transformers 5.x (not for 4.57's gpt_oss, see below).
``"swapped"``   lora_A acts on the *output* features. peft 0.18.x writes this for ``(E, out, in)`` parameters
                (qwen3_moe, mixtral, deepseek_v3, glm4_moe, qwen3_5_moe ...); peft 0.19.0 wrote it for all on 5.x.

The names follow the parameter's real orientation: ``is_transposed`` here means the experts are ``(E, in, out)``
(gpt_oss, on every transformers version). peft's wrapper keeps the truth in ``_did_swap_in_out_features`` (lora_A
acts on ``d2``): layout is "standard" iff that flag differs from ``is_transposed``. peft, however, decides that flag
from the experts module's ``is_transposed`` *attribute*, which transformers 5.x sets on gpt_oss and 4.57 does not:
so on 5.x peft 0.18 and 0.19.1+ both write "standard" for gpt_oss, while on 4.57 0.18 writes "standard" and
0.19.1+ "swapped". What a peft version writes therefore depends on the module, not on the model type alone
(:func:`layout_from_peft_version`, :func:`expected_layout`).

peft's per-expert convention (both layouts): ``A.reshape(E, r, ·)`` is expert-major (rows ``e*r:(e+1)*r``)
while ``B.reshape(·, r, E)`` has the expert index fastest, so expert ``e``'s columns are ``B[:, e::E]``.
Slicing ``B`` contiguously (``B[:, e*r:(e+1)*r]``) mixes experts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .registry import DriftError, Target, code_mentions

log = logging.getLogger("shims")

STANDARD = "standard"
SWAPPED = "swapped"
FUSED = "fused"
LAYOUTS = (STANDARD, SWAPPED)

# Our own record of what a converted adapter holds; peft ignores extra files in an adapter folder.
LAYOUT_RECORD = "moe_shims_layout.json"

# Architectures whose fused experts are (E, in, out) on every transformers version (the orientation the layout
# names refer to). Whether the experts module also *declares* it (is_transposed, read by peft) depends on the
# transformers version; that is detected on the module itself (_declares_transposed).
_TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss"})
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # registration order in every experts module
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


class AmbiguousLayoutError(ValueError):
    """Nothing tells whether an expert LoRA is "standard" or "swapped" (square dims and no version/flag)."""


# --------------------------------------------------------------------------------------------------
# peft's per-expert convention
# --------------------------------------------------------------------------------------------------
def expert_factors(lora_A, lora_B, num_experts: int, expert: int):
    """Expert ``expert``'s own factors ``(A_e (r, a_in), B_e (b_out, r))`` under peft's convention."""
    rank = _rank_of(lora_A, num_experts)
    return lora_A[expert * rank:(expert + 1) * rank], lora_B[:, expert::num_experts]


def stack_expert_factors(factors):
    """Inverse of :func:`expert_factors`: ``[(A_e, B_e), ...]`` -> peft's ``(lora_A, lora_B)``."""
    import torch

    a_list = [a for a, _ in factors]
    b_list = [b for _, b in factors]
    lora_A = torch.cat(a_list, dim=0)
    # column r*E + e of lora_B is rank r of expert e
    lora_B = torch.stack(b_list, dim=2).reshape(b_list[0].shape[0], -1)
    return lora_A, lora_B


def expert_delta(lora_A, lora_B, num_experts: int, a_on_d2: bool, scaling: float):
    """The ``(E, d1, d2)`` delta of an expert LoRA, built expert by expert from :func:`expert_factors`.

    ``a_on_d2`` is peft's ``_did_swap_in_out_features``: lora_A acts on d2 (``delta_e = B_e @ A_e``) or on d1
    (``delta_e = (B_e @ A_e).T``). Export uses the wrapper's own ``get_delta_weight``; this is the same
    arithmetic written per expert, for conversion checks.
    """
    import torch

    deltas = []
    for e in range(num_experts):
        a_e, b_e = expert_factors(lora_A, lora_B, num_experts, e)
        prod = b_e @ a_e  # (b_out, a_in)
        deltas.append(prod if a_on_d2 else prod.T)
    return torch.stack(deltas) * scaling


def swap_expert_factors(lora_A, lora_B, num_experts: int):
    """Re-express an expert LoRA in the other layout with exactly the same delta (an involution).

    ``A' = B.reshape(out, r, E).permute(2, 1, 0).reshape(E*r, out)`` and
    ``B' = A.reshape(E, r, in).permute(2, 1, 0).reshape(in, r*E)``: expert e's new A is its old B transposed and
    vice versa, so ``B'_e @ A'_e == (B_e @ A_e).T`` per expert, which is what the other einsum undoes.
    """
    rank = _rank_of(lora_A, num_experts)
    a_in, b_out = lora_A.shape[1], lora_B.shape[0]
    new_A = lora_B.reshape(b_out, rank, num_experts).permute(2, 1, 0).reshape(num_experts * rank, b_out)
    new_B = lora_A.reshape(num_experts, rank, a_in).permute(2, 1, 0).reshape(a_in, rank * num_experts)
    return new_A.contiguous(), new_B.contiguous()


def _rank_of(lora_A, num_experts: int) -> int:
    rows = lora_A.shape[0]
    if num_experts <= 0 or rows % num_experts:
        raise ValueError(f"lora_A has {rows} rows, not a multiple of num_experts={num_experts}")
    return rows // num_experts


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def layout_from_flag(a_on_d2: bool, is_transposed: bool) -> str:
    """Layout of a LoRA whose lora_A acts on the parameter's d2 (``a_on_d2``) for the given orientation."""
    return STANDARD if a_on_d2 != bool(is_transposed) else SWAPPED


# The flag peft's ParamWrapper keeps for "lora_A acts on the parameter's d2". Declared by the patches that read it, so
# that shims.status() shows when a peft version stops keeping it.
SWAP_FLAG = "_did_swap_in_out_features"
SWAP_FLAG_TARGET = Target("peft.tuners.lora.layer", f"ParamWrapper.{SWAP_FLAG}", on_instances=True)


def did_swap_in_out_features(wrapper) -> bool:
    """peft's ``_did_swap_in_out_features`` of a live ``ParamWrapper``: whether lora_A acts on the parameter's d2.

    peft >= 0.19 sets the flag in ``ParamWrapper.__init__``; peft 0.18.x has no flag because its ParamWrapper never
    swaps (lora_A always acts on d1). Which of the two this peft is, is decided by feature detection, not by version:
    whether the wrapper's class (or a base) has code that sets or reads the flag. A wrapper of such a class without
    the flag is drift (a peft that moved or renamed it): guessing False there would silently transpose every delta.
    """
    try:
        return bool(getattr(wrapper, SWAP_FLAG))
    except AttributeError:
        pass
    if not code_mentions(type(wrapper), SWAP_FLAG):
        return False  # peft 0.18.x: no in/out swap at all
    raise DriftError(
        f"{type(wrapper).__qualname__} instance has no {SWAP_FLAG} although its class sets it (peft "
        f"{_installed_version('peft')}): cannot tell which side of the expert parameter lora_A acts on")


def _installed_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def wrapper_layout(wrapper, is_transposed: bool | None = None) -> str:
    """Layout of a live peft ``ParamWrapper`` on a 3D expert parameter.

    Read from ``_did_swap_in_out_features`` (:func:`did_swap_in_out_features`; peft 0.18 wrappers lack it and never
    swap). That is the attribute peft's own forward and ``get_delta_weight`` branch on, so it is right for 0.19.0 too.
    ``is_transposed``: whether the parameter is ``(E, in, out)``; by default what the experts module declares,
    which is right on transformers 5.x. transformers 4.57's gpt_oss experts are ``(E, in, out)`` without declaring
    it: pass ``True`` there (or use :class:`ExpertDims` ``.from_config(model.config).is_transposed``).
    """
    if is_transposed is None:
        is_transposed = _declares_transposed(wrapper.get_base_layer())
    return layout_from_flag(did_swap_in_out_features(wrapper), is_transposed)


def layout_from_shapes(a_in: int, b_out: int, d1: int, d2: int, is_transposed: bool) -> str:
    """Layout from tensor shapes; raises AmbiguousLayoutError when d1 == d2 (both layouts look the same)."""
    if {a_in, b_out} != {d1, d2} and not (a_in == b_out == d1 == d2):
        raise ValueError(f"LoRA shapes (A in={a_in}, B out={b_out}) do not fit a parameter (E, {d1}, {d2})")
    if d1 == d2:
        raise AmbiguousLayoutError(
            f"expert parameter (E, {d1}, {d2}) is square: 'standard' and 'swapped' LoRA shapes coincide; "
            "pass the adapter's peft_version or the live wrapper instead of guessing")
    return layout_from_flag(a_on_d2=(a_in == d2), is_transposed=is_transposed)


def peft_a_on_d2(version: str | None, declares_transposed: bool | None) -> bool | None:
    """peft ``version``'s ``_did_swap_in_out_features`` (lora_A acts on d2), or None when that is not known.

    peft reads the experts module's ``is_transposed`` attribute (``declares_transposed``; None: unknown), not the
    parameter's real orientation: 0.18 never swaps, 0.19.0 swaps iff the module declares it, 0.19.1+ iff not.
    """
    if not version:
        return None
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return None
    if v >= Version("0.19.1"):
        return None if declares_transposed is None else not declares_transposed
    if v >= Version("0.19.0"):
        # a 0.19.1 dev build may carry either behaviour, so only the final 0.19.0 release counts
        return declares_transposed if v.release == (0, 19, 0) and not v.is_devrelease else None
    return False  # 0.18 never swaps


def layout_from_peft_version(version: str | None, is_transposed: bool | None,
                             declares_transposed: bool | None = None) -> str | None:
    """The layout peft ``version`` writes, or None when that is not known.

    ``is_transposed``: the experts are ``(E, in, out)`` (None: unknown). ``declares_transposed``: the experts module
    of the transformers that peft ran on has ``is_transposed`` set (None: unknown). Only ``(E, in, out)`` experts
    declare it, so it matters for them alone, and for them it differs between transformers versions (4.57's
    gpt_oss does not declare it, 5.x's does). A saved adapter records its peft version but not its transformers.
    """
    if is_transposed is None:
        return None
    if not is_transposed:
        if declares_transposed:
            raise ValueError("experts that declare is_transposed are (E, in, out): is_transposed must be True")
        declares_transposed = False
    a_on_d2 = peft_a_on_d2(version, declares_transposed)
    return None if a_on_d2 is None else layout_from_flag(a_on_d2, is_transposed)


def expected_layout(base, peft_version: str | None = None) -> str:
    """The layout peft (``peft_version``; default: the installed one) gives the expert LoRAs of ``base`` under the
    installed transformers: what a saved adapter must be converted to before it loads into ``base``.

    ``base``: the loaded base model, whose experts modules are inspected (peft decides from the module), or its
    transformers config, in which case the model is built on the meta device to inspect the same modules.
    """
    import torch

    if peft_version is None:
        import peft

        peft_version = peft.__version__
    if isinstance(base, torch.nn.Module):
        model = base
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base)
    from .quant import iter_expert_modules  # by structure; never reads (dequantizes) 4-bit expert tensors

    modules = [m for _, m in iter_expert_modules(model)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no fused experts module (3D gate_up_proj / down_proj)")
    declared = {_declares_transposed(m) for m in modules}
    if len(declared) != 1:
        raise ValueError(f"{type(model).__name__}: experts modules disagree on is_transposed")
    declares = declared.pop()
    is_transposed = declares or ExpertDims.from_config(model.config).is_transposed
    layout = layout_from_peft_version(peft_version, is_transposed, declares)
    if layout is None:
        raise ValueError(f"peft {peft_version!r}: no known expert LoRA convention for this version")
    return layout


def _declares_transposed(module) -> bool:
    """What peft sees: transformers 5.x sets ``is_transposed`` on experts modules; 4.57 has no such attribute."""
    return bool(getattr(module, "is_transposed", False))


@dataclass(frozen=True)
class ExpertDims:
    """What detection needs to know about the base model: expert count and the expert parameters' shapes."""

    num_experts: int
    hidden: int
    intermediate: int
    is_transposed: bool  # (E, in, out) parameters, whatever the installed transformers declares

    def param_shape(self, param: str) -> tuple[int, int]:
        gate_up = (2 * self.intermediate, self.hidden)
        down = (self.hidden, self.intermediate)
        d1d2 = gate_up if param == "gate_up_proj" else down
        return tuple(reversed(d1d2)) if self.is_transposed else d1d2

    @classmethod
    def from_config(cls, config) -> "ExpertDims":
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        cfg = get("text_config") or {}
        if cfg and not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        if cfg and not any(get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts")):
            get = cfg.get
        model_type = get("model_type")
        experts = get("num_experts") or get("n_routed_experts") or get("num_local_experts")
        inter = get("moe_intermediate_size") or get("intermediate_size")
        if not (experts and inter and get("hidden_size")):
            raise ValueError(f"config of model_type {model_type!r} does not describe MoE experts")
        return cls(int(experts), int(get("hidden_size")), int(inter),
                   model_type in _TRANSPOSED_EXPERT_MODEL_TYPES)


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
    config = _read_json(adapter_dir / _ADAPTER_CONFIG)
    tensors = _read_tensors(adapter_dir)
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
    if base_config is None:
        base = adapter_config.get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            base_config = base
    if base_config is None:
        return None
    if isinstance(base_config, (str, os.PathLike)):
        path = Path(base_config)
        base_config = _read_json(path / "config.json" if path.is_dir() else path)
    return ExpertDims.from_config(base_config)


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

    Which layout a given peft and transformers expect: :func:`expected_layout`. The written adapter_config.json's
    ``peft_version`` names a peft release whose convention implies ``layout`` for these experts (so that
    version-based readers do not contradict it); the original version and what was done are kept in
    ``moe_shims_layout.json``, which is what this module trusts first.
    """
    if to not in (STANDARD, SWAPPED, FUSED):
        raise ValueError(f"to must be one of 'standard', 'swapped', 'fused', not {to!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'standard' or 'swapped', not {layout!r}")
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / _ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{src_dir} has no {_ADAPTER_CONFIG}: not a saved peft adapter")
    if dst_dir.exists() and not overwrite:
        raise FileExistsError(f"{dst_dir} exists; pass overwrite=True to replace it")
    config = _read_json(src_dir / _ADAPTER_CONFIG)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters are supported, not {config.get('peft_type')}")
    tensors = _read_tensors(src_dir)
    if to == FUSED:
        tensors, config, summary = _fuse_per_expert(tensors, config, layout)
    else:
        tensors, config, summary = _relayout(src_dir, tensors, config, to, base_config)
        layout = to
    record = {"expert_layout": layout, "source_peft_version": config.get("peft_version"), **summary}
    config["peft_version"] = _peft_version_writing(layout, summary.get("experts_transposed"))
    _write_adapter(src_dir, dst_dir, tensors, config, record, overwrite)
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
    rank = _rank_for(prefix, info.param, config)
    if info.a_shape[0] % rank:
        raise ValueError(f"{prefix}: lora_A rows {info.a_shape[0]} not a multiple of r={rank}")
    return info.a_shape[0] // rank


def _rank_for(prefix, param, config) -> int:
    from_pattern = _pattern_value(config.get("rank_pattern") or {}, f"{_module_path(prefix)}.{param}")
    return int(from_pattern if from_pattern is not None else config["r"])


def _pattern_value(patterns: dict, key: str):
    # the same rule as peft.utils.other.get_pattern_key
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return None


def _module_path(prefix: str) -> str:
    path = re.sub(r"(\.base_layer)+$", "", prefix)
    return path.removeprefix("base_model.model.")


_PER_EXPERT_KEY = re.compile(
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
        m = _PER_EXPERT_KEY.match(key)
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
def _read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _read_layout_record(adapter_dir: Path) -> str | None:
    path = adapter_dir / LAYOUT_RECORD
    return _read_json(path).get("expert_layout") if path.is_file() else None


def _read_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = adapter_dir / _ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {_ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    return load_file(str(path))


def _write_adapter(src_dir: Path, dst_dir: Path, tensors, config, record, overwrite: bool) -> None:
    """Write into a temp folder next to ``dst_dir`` and rename it into place (old content kept on failure)."""
    from safetensors.torch import save_file

    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_dir.name}.", dir=dst_dir.parent))
    try:
        for extra in src_dir.iterdir():  # README, tokenizer files ...
            if extra.is_file() and extra.name not in (_ADAPTER_WEIGHTS, _ADAPTER_CONFIG, LAYOUT_RECORD):
                shutil.copy2(extra, tmp / extra.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        for name, data in ((_ADAPTER_CONFIG, config), (LAYOUT_RECORD, record)):
            with open(tmp / name, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
        replace_dir(tmp, dst_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move a finished temp folder to ``dst``; an existing ``dst`` is swapped out only after that succeeds."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.rmdir(old)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True)
