"""peft's LoRA convention on fused expert parameters: the two layouts, per-expert slicing, and which layout a live
wrapper, a peft version or a base model implies. (Reading and rewriting saved adapter folders: shims.adapters.adapter_convert.)

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

from dataclasses import dataclass

from ..registry import DriftError, Target, code_mentions
from ..quant.storage import iter_expert_modules

STANDARD = "standard"
SWAPPED = "swapped"
LAYOUTS = (STANDARD, SWAPPED)

# Architectures whose fused experts are (E, in, out) on every transformers version (the orientation the layout
# names refer to). Whether the experts module also *declares* it (is_transposed, read by peft) depends on the
# transformers version; that is detected on the module itself (declares_transposed).
_TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss"})


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
        is_transposed = declares_transposed(wrapper.get_base_layer())
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
    modules = [m for _, m in iter_expert_modules(model)]  # by structure: never dequantizes 4-bit expert tensors
    if not modules:
        raise ValueError(f"{type(model).__name__} has no fused experts module (3D gate_up_proj / down_proj)")
    declared = {declares_transposed(m) for m in modules}
    if len(declared) != 1:
        raise ValueError(f"{type(model).__name__}: experts modules disagree on is_transposed")
    declares = declared.pop()
    is_transposed = declares or ExpertDims.from_config(model.config).is_transposed
    layout = layout_from_peft_version(peft_version, is_transposed, declares)
    if layout is None:
        raise ValueError(f"peft {peft_version!r}: no known expert LoRA convention for this version")
    return layout


def declares_transposed(module) -> bool:
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
