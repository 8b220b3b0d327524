"""The verdict rules: one table, used by the report (which prints it) and by the gate.

A case passes when every stage ran and every rule that applies to it holds. Bounds are exact-reference
comparisons (trained PeftModel vs its own merge / export / reloaded adapter), not loose quality thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

KL_ADAPTER_MAX = 1e-5      # reloading the same adapter into the same base must reproduce the logits
KL_FOREIGN_MAX = 1e-5      # an adapter from another cell, converted where needed, reproduces its publisher's logits
PREQUANTIZED_V4_MAX_ABS = 1e-5  # a 4.x pre-quantized checkpoint on 5.x: 4.x's logits (fp32 compute), bit-exact storage
# A 5.x fused expert adapter split into per-expert LoRA modules on 4.57 (fp32 compute): each expert's delta is
# re-sliced, never recomputed, so only the order of float sums differs (fused vs per-expert matmuls). Measured max
# |d logits| 2.9e-6 .. 9.2e-6 (qwen3_moe, mixtral, deepseek_v3, glm4_moe; three 5.x publishers; |logits| up to ~10,
# where one fp32 ulp is ~1e-6), KL <= 3e-13; gate/up halves swapped (mutation per_expert_gate_up_swapped): 8.3 .. 10.
# The bound is ~10x the worst measured summation noise, six orders of magnitude below a misplaced delta.
PER_EXPERT_MAX_ABS = 1e-4
KL_EXPORT_MAX = 1e-4       # merged export reloaded in fp32: only bf16 rounding of W + delta remains
KL_EXPORT_FP32_MAX = 1e-6  # the same export in float32: the merge itself must be exact
KL_MERGED_MAX = 1e-4       # in-place merge into float experts (4-bit merges re-quantize: reported, not bounded)
LOSS_FALL_RATIO = 0.9      # mean of the last 3 logged losses <= 0.9 x mean of the first 3
GC_GRAD_MAX_ABS = 0.0      # gradient checkpointing recomputes the same ops: first-step LoRA gradients identical
# QLoRA recipe (quant "nf4-recipe"): the trained model computes in bf16, and bf16 kernels differ between CPUs (measured
# KL(trained || float32 export) 0.0006-0.0096 on one machine, 0.013-0.016 on another, same code and versions), so no
# bound on a bf16 value is machine-independent. The recipe's exact check is kl_export_fp32 against the trained model's
# float32 twin (the same stored values and LoRA factors, cast exactly, computing in float32), held as tightly as the fp32
# cases. Every bf16 KL is reported, never gated (REPORTED_ONLY); a native export, which has no float32 twin to match,
# must carry the adapter: closer to the trained model than the base is (an exact ordering, not a measured margin).
RECIPE_OPTIMIZERS_8BIT = ("paged_adamw_8bit", "adamw_bnb_8bit")
# Fast expert LoRA (shims.lora.fast_lora) == peft's own ParamWrapper path, trained model, float32 compute (rule
# fast_path_equals_peft). Both compute, per routed expert e and output element, y = x . (W_e + s delta_e) over an
# n-wide input with a rank-r LoRA, in different orders: peft materialises W_e + s B_e A_e and takes one n-term
# product; the fast path takes x . W_e and s (x . A_e^T) . B_e^T (n- and r-term products) and adds them. Wilkinson's
# bound for a k-term sum in ANY order (blocking, FMA, threads: what differs between CPU kernels), with u = 2^-24 the
# float32 unit roundoff, is gamma_k = k u / (1 - k u) ~ k u times sum |x_i| |w_i|; each path is within
# gamma_(n + r + 3) of the exact value (n + r products, the W + delta / base + LoRA addition, the scaling, a bias), so
# the two differ by at most 2 (n + r + 3) u per projection, relatively. A gated projection counts twice
# (act(gate) * up adds the relative errors of both halves), and the weighted sum of at most E routed outputs per token
# adds E u. Summed over every experts module on the fast path (first order: errors of successive layers add), that is
# cases.pipeline.fast_path_summands: S u is the relative perturbation the fast path may introduce, and the bound on
# max |d logits| is S u max |logit|. The assumptions, stated: |x| |W| ~ |x W| (no cancellation) and the layers after
# an experts module do not amplify a relative perturbation of its output (RMSNorm, attention and residual adds do not
# grow it to first order); the slack that covers both where they fail mildly is that gamma_k is a worst case, linear in
# k, while rounding errors of k-term sums grow like sqrt(k). No term depends on the machine: the same S for every CPU
# or GPU kernel. A routing decision that flips on a near tie would break it (|d| ~ 1): none seen. Where no module is on
# the fast path (ergo's experts are refused: both runs are peft's path) S = 0 and the logits must be identical.
FP32_UNIT_ROUNDOFF = 2.0 ** -24

# Values the cases record that no rule bounds: each depends on bf16 kernels, a seed or how sharp training made the
# logits, so a bound on it would be a constant tuned to one machine. The report lists them beside the rules.
REPORTED_ONLY: dict[str, str] = {
    "kl_export_rounded": "KL(trained in float32 || float32 export rounded to bf16, computed in float32)",
    "kl_export_fp32_vs_bf16": "recipe: KL(trained, bf16 compute || float32 export): bf16 compute noise",
    "kl_recipe_bf16_vs_fp32": "recipe: KL(float32 twin || trained model computing in bf16): bf16 compute noise",
    "kl_base": "KL(trained || base without the adapter): how much the adapter changed the model (only ordered "
               "against: merge_moves_4bit, export_carries_adapter)",
    "rl_max_merged_kl": "merge/unmerge cycles: KL of the re-quantized merge (its bytes are checked exactly)",
    "serve_control_max_abs": "serving: max |d log p| between the engine and transformers on the same float32 folder "
                             "(the engine's own float32 noise, the control)",
    "serve_fp32_vs_trained_max_abs": "serving: max |d log p| between the served float32 export and the trained "
                                     "model in float32 (bounded through kl_serve_fp32)",
    "serve_bf16_vs_transformers_max_abs": "serving: max |d log p|, engine vs transformers on the bf16 export (bf16 "
                                          "kernels of two libraries)",
    "kl_serve_bf16_vs_trained": "serving: KL(trained model as it computes || served bf16 export)",
}
# Gated only where the compute is float32 and the result must be exact (rules kl_merged, kl_export); elsewhere reported.
REPORTED_WHERE_NOT_FP32: dict[str, str] = {
    "kl_export": "shims exports and the recipe: KL(trained || 16-bit export), bf16 rounding of W + delta (recipe: and "
                 "bf16 compute)",
    "kl_merged": "4-bit merges: KL(trained || merged), one re-quantization of W + delta",
}

PASS, FAIL, ERROR, NA = "pass", "fail", "error", "n/a"
# stage statuses that mean the harness stopped the case rather than the case failing by itself
ABORTED = ("timeout", "killed", "crashed")


def _num(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _all_agree(text) -> bool:
    if not isinstance(text, str) or "/" not in text:
        return False
    same, total = text.split("/")
    return same == total and int(total) > 0


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    applies: Callable[[dict], bool]
    holds: Callable[[dict], bool]
    metrics: tuple[str, ...] = ()  # what applies/holds read: the gate's baseline keeps exactly these


def _is(quant: str) -> Callable[[dict], bool]:
    return lambda case: case.get("quant") == quant


def _four_bit(case: dict) -> bool:
    """A 4-bit load (nf4, the QLoRA recipe); results written before the flag existed had only "nf4"."""
    return bool(case.get("four_bit", case.get("quant") == "nf4"))


def _recipe(case: dict) -> bool:
    return bool(case.get("recipe"))


def _ran(stage: str) -> Callable[[dict], bool]:
    return lambda case: case.get("stages", {}).get(stage, {}).get("status") == "ok"


def _le(key: str, bound: float) -> Callable[[dict], bool]:
    def check(case: dict) -> bool:
        value = _num(case.get("metrics", {}), key)
        return value is not None and math.isfinite(value) and value <= bound
    return check


def _loss_falls(case: dict) -> bool:
    m = case.get("metrics", {})
    first, last = _num(m, "loss_first3"), _num(m, "loss_last3")
    return first is not None and last is not None and last <= LOSS_FALL_RATIO * first


def _positive(key: str) -> Callable[[dict], bool]:
    def check(case: dict) -> bool:
        value = _num(case.get("metrics", {}), key)
        return value is not None and math.isfinite(value) and value > 0
    return check


def _expert_lora_moved(case: dict) -> bool:
    m = case.get("metrics", {})
    a, b = m.get("expert_lora_A_moved", 0), m.get("expert_lora_B_moved", 0)
    return a > 0 and b > 0 and a == m.get("expert_lora_A_total") and b == m.get("expert_lora_B_total")


def _experts_quantized(case: dict) -> bool:
    m = case.get("metrics", {})
    total = m.get("experts_expert_tensors") or 0
    return total > 0 and m.get("experts_quantized") == total


def _routers_accounted(m: dict, prefix: str) -> bool:
    """Router counts recorded under ``prefix``: every router is 4-bit, kept wide on purpose, or kept float by the
    case's own llm_int8_skip_modules (an arch workaround) (0 == 0 if none)."""
    quantized, kept_wide, skipped, routers = (m.get(f"{prefix}{key}") or 0
                                              for key in ("quantized", "kept_wide", "skipped", "routers"))
    return quantized + kept_wide + skipped == routers


def _routers_quantized(case: dict) -> bool:
    m = case.get("metrics", {})
    return (m.get("routers_routers") or 0) > 0 and _routers_accounted(m, "routers_")


def _export_complete(case: dict) -> bool:
    m = case.get("metrics", {})
    if "export_attempted" not in m:
        return True  # native export (save_pretrained of the merged model) reports no counts
    return m.get("export_attempted", 0) > 0 and m.get("export_applied") == m.get("export_attempted")


def _export_is_16bit(case: dict) -> bool:
    return case.get("metrics", {}).get("export_quantized") == 0


def _merge_changed_experts(case: dict) -> bool:
    m = case.get("metrics", {})
    total = m.get("merged_experts_total") or 0
    return total > 0 and m.get("merged_experts_changed") == total


def _below(key: str, than: str) -> Callable[[dict], bool]:
    """metric ``key`` < metric ``than``, both recorded (an exact ordering of two values of the same run)."""
    def check(case: dict) -> bool:
        m = case.get("metrics", {})
        value, bound = _num(m, key), _num(m, than)
        return value is not None and bound is not None and value < bound
    return check


def _prequantized_roundtrip(case: dict) -> bool:
    m = case.get("metrics", {})
    total = m.get("prequantized_expert_tensors") or 0
    return (total > 0 and m.get("prequantized_experts_quantized") == total
            and _routers_accounted(m, "prequantized_routers_")
            and _le("prequantized_max_abs", 0.0)(case))


def _per_expert_exact(case: dict) -> bool:
    """Every published fused adapter loaded, LoRA sits on every per-expert module, and the publisher's logits are
    reproduced (max |d| <= PER_EXPERT_MAX_ABS)."""
    m = case.get("metrics", {})
    linears = m.get("per_expert_linear_modules") or 0
    return ((m.get("per_expert_total") or 0) > 0 and m.get("per_expert_ok") == m.get("per_expert_total")
            and linears > 0 and m.get("per_expert_lora_modules") == linears
            and _le("per_expert_max_abs", PER_EXPERT_MAX_ABS)(case))


def _gc_grads_equal(case: dict) -> bool:
    m = case.get("metrics", {})
    recomputed = (m.get("gc_layer_calls") or 0) == 2 * (m.get("plain_layer_calls") or 0) > 0
    return (m.get("gc_grad_tensors") or 0) > 0 and recomputed and _le("gc_grad_max_abs", GC_GRAD_MAX_ABS)(case)


def fast_path_bound(metrics: dict) -> float | None:
    """The bound of rule fast_path_equals_peft on max |d logits| (derived at FP32_UNIT_ROUNDOFF), or None where the
    case did not record its terms."""
    summands, logit_max = _num(metrics, "fast_path_summands"), _num(metrics, "fast_vs_peft_logit_max")
    if summands is None or logit_max is None:
        return None
    return FP32_UNIT_ROUNDOFF * summands * logit_max


def _fast_path_equals_peft(case: dict) -> bool:
    """max |logits(fast path) - logits(peft's path)| <= fast_path_bound, every fast-path module ran it (and none while
    disabled): a fast path that silently did not run would compare peft's path with itself."""
    m = case.get("metrics", {})
    bound, diff = fast_path_bound(m), _num(m, "fast_vs_peft_max_abs")
    experts, calls = m.get("fast_path_experts") or 0, m.get("fast_path_calls") or 0
    ran = calls >= experts and (calls > 0) == (experts > 0) and m.get("fast_path_calls_disabled") == 0
    return (bound is not None and diff is not None and math.isfinite(diff) and math.isfinite(bound)
            and diff <= bound and ran)


def _adapter_outcomes_predicted(case: dict) -> bool:
    """Every adapter layout the engine loaded has a prediction, equal to what it did; an outcome "wrong" (the engine
    holds expert LoRA that is not peft's) is never predicted, so it always fails."""
    m = case.get("metrics", {})
    measured, predicted = m.get("serve_adapter_outcomes") or {}, m.get("serve_adapter_predicted") or {}
    ran = {form: outcome for form, outcome in measured.items() if outcome != NA}
    options = m.get("serve_adapter_options_predicted") or {}  # form -> the predicted options are those it loaded with
    with_options = [form for form, outcome in ran.items() if outcome == "loads_with_option"]
    return (bool(ran) and all(predicted.get(form) == outcome for form, outcome in ran.items())
            and all(options.get(form) is True for form in with_options))


def _optimizer_8bit(case: dict) -> bool:
    """The 8-bit optimizer ran with 8-bit state on every tensor large enough for it; or, where bitsandbytes runs
    none on the device, every one asked for was passed over with a recorded reason (the report shows it)."""
    m = case.get("metrics", {})
    if m.get("optim") in RECIPE_OPTIMIZERS_8BIT:
        return (m.get("optim_state_eligible") or 0) > 0 and m.get("optim_state_8bit") == m.get("optim_state_eligible")
    asked = [a for a in (m.get("optim_requested") or "").split(",") if a]
    return len(m.get("optim_fallbacks") or []) == len(asked) > 0


def _shims_export(case: dict) -> bool:
    return "export_attempted" in case.get("metrics", {})


def _samples(key: str) -> Callable[[dict], bool]:
    return lambda case: _all_agree(case.get("metrics", {}).get(key))


RULES: tuple[Rule, ...] = (
    Rule("loss_falls", f"training loss falls: mean(last 3) <= {LOSS_FALL_RATIO} x mean(first 3)",
         _ran("train"), _loss_falls,
         metrics=("loss_first3", "loss_last3")),
    Rule("grad_norm", "trainer grad_norm > 0 and finite", _ran("train"), _positive("grad_norm"),
         metrics=("grad_norm",)),
    Rule("expert_lora_trains", "expert LoRA grad norm > 0 and every expert lora_A and lora_B changed",
         _ran("train"), lambda c: _positive("expert_lora_grad_norm")(c) and _expert_lora_moved(c),
         metrics=("expert_lora_grad_norm", "expert_lora_A_moved", "expert_lora_A_total",
                  "expert_lora_B_moved", "expert_lora_B_total")),
    Rule("experts_4bit", "4-bit loads: every routed-expert weight tensor is stored in 4 bits after load",
         lambda c: _four_bit(c) and _ran("load")(c), _experts_quantized,
         metrics=("experts_quantized", "experts_expert_tensors")),
    Rule("routers_4bit", "nf4 over fused experts (5.x): every MoE router weight is stored in 4 bits, as "
         "transformers 4.x's Linear4bit routers were, except routers the model keeps wider than its dtype "
         "(deepseek_v3, glm4_moe: float32) or the case's llm_int8_skip_modules keeps float",
         lambda c: _ran("load")(c) and "routers_routers" in c.get("metrics", {}),
         _routers_quantized, metrics=("routers_quantized", "routers_kept_wide", "routers_skipped", "routers_routers")),
    Rule("kl_merged", f"bf16: KL(trained || merged) <= {KL_MERGED_MAX:g}",
         lambda c: _is("bf16")(c) and _ran("merge")(c), _le("kl_merged", KL_MERGED_MAX),
         metrics=("kl_merged",)),
    Rule("merge_moves_4bit", "nf4: the merge into 4-bit weights re-quantizes W + delta, so it is not exact; it "
         "must still bring the model closer to the trained one than the base without the adapter "
         "(KL(trained || merged) < KL(trained || base)); a merge that silently dropped the deltas fails",
         lambda c: _four_bit(c) and _ran("merge")(c) and "kl_base" in c.get("metrics", {}),
         _below("kl_merged", "kl_base"),
         metrics=("kl_merged", "kl_base")),
    Rule("merge_changes_experts", "merge_and_unload changed every routed-expert weight tensor (a merge that "
         "silently skipped the experts fails)",
         lambda c: _ran("merge")(c) and "merged_experts_total" in c.get("metrics", {}), _merge_changed_experts,
         metrics=("merged_experts_changed", "merged_experts_total")),
    Rule("samples_merged", "bf16: greedy samples of the merged model match the trained model's",
         lambda c: _is("bf16")(c) and _ran("merge")(c), _samples("samples_merged"),
         metrics=("samples_merged",)),
    Rule("export_complete", "shims export: every LoRA delta applied (applied == attempted > 0)",
         _ran("export"), _export_complete,
         metrics=("export_applied", "export_attempted")),
    Rule("export_16bit", "the exported checkpoint reloads with 16-bit (not 4-bit) experts",
         lambda c: _ran("export_reload")(c) and c.get("metrics", {}).get("export_attempted") is not None,
         _export_is_16bit,
         metrics=("export_quantized", "export_attempted")),
    Rule("kl_export", f"native export (merged model's save_pretrained): KL(trained || reload) <= {KL_EXPORT_MAX:g}",
         lambda c: _ran("export_reload")(c) and not _shims_export(c) and not _recipe(c),
         _le("kl_export", KL_EXPORT_MAX),
         metrics=("kl_export", "export_attempted")),
    Rule("samples_export", "native export: greedy samples of the reload match the trained model's",
         lambda c: _ran("export_reload")(c) and not _shims_export(c) and not _recipe(c), _samples("samples_export"),
         metrics=("samples_export", "export_attempted")),
    Rule("kl_export_fp32", f"shims export written in float32: KL(trained model in float32 || reload) <= "
         f"{KL_EXPORT_FP32_MAX:g}: the merge itself is exact (recipe: against the trained model's float32 twin, its "
         "stored values and LoRA factors cast exactly, as bf16 compute is not reproducible across CPUs)",
         lambda c: _ran("export")(c) and _shims_export(c),
         _le("kl_export_fp32", KL_EXPORT_FP32_MAX),
         metrics=("kl_export_fp32", "export_attempted")),
    Rule("samples_export_fp32", "shims export in float32: greedy samples match the trained model's in float32",
         lambda c: _ran("export")(c) and _shims_export(c), _samples("samples_export_fp32"),
         metrics=("samples_export_fp32", "export_attempted")),
    Rule("export_rounding", "shims 16-bit export == the float32 export rounded to bf16 (max |d logits| == 0); "
         "its KL to the trained model, bf16 rounding of W + delta only, is reported",
         lambda c: _ran("export_reload")(c) and _shims_export(c), _le("export_rounding_max_abs", 0.0),
         metrics=("export_rounding_max_abs", "export_attempted")),
    Rule("export_carries_adapter", "native QLoRA recipe export (bf16 compute, no float32 twin to match): "
         "KL(trained || export) < KL(trained || base), the export carries the adapter (the bf16 KL is reported)",
         lambda c: _recipe(c) and _ran("export_reload")(c) and not _shims_export(c), _below("kl_export", "kl_base"),
         metrics=("kl_export", "kl_base", "export_attempted")),
    Rule("gc_grads_equal", "4-bit loads: gradient checkpointing recomputes each layer (2 forward calls vs 1) and the "
         f"first step's LoRA gradients with and without it agree (max |d| <= {GC_GRAD_MAX_ABS:g})",
         lambda c: _four_bit(c) and _ran("gc_grads")(c), _gc_grads_equal,
         metrics=("gc_grad_tensors", "gc_grad_max_abs", "gc_layer_calls", "plain_layer_calls")),
    Rule("fast_path_equals_peft", "shims on, 4-bit, float32 compute: the trained model's logits with the fast "
         "expert-LoRA path equal peft's own path (shims.lora.fast_lora.ENABLED off) within float32 rounding: max |d| <= "
         "2^-24 x S x max |logit|, S the float operations the fast path reorders (derived in harness/verdict.py; 0 "
         "where every experts class is refused), and every fast-path module ran it",
         lambda c: _ran("fast_path")(c) and "fast_vs_peft_max_abs" in c.get("metrics", {}), _fast_path_equals_peft,
         metrics=("fast_vs_peft_max_abs", "fast_vs_peft_logit_max", "fast_path_summands", "fast_path_experts",
                  "fast_path_calls", "fast_path_calls_disabled")),
    Rule("recipe_checkpointing", "QLoRA recipe: gradient checkpointing was active while training (each layer's "
         "forward ran twice per step)", lambda c: _recipe(c) and _ran("train")(c),
         lambda c: (_num(c.get("metrics", {}), "train_layer_calls_per_step") or 0) >= 2,
         metrics=("train_layer_calls_per_step",)),
    Rule("recipe_optimizer_8bit", "QLoRA recipe: the bitsandbytes 8-bit optimizer ran with 8-bit state for every "
         "trained tensor of >= 4096 elements (or none runs on the device, each reason recorded)",
         lambda c: _recipe(c) and _ran("train")(c), _optimizer_8bit,
         metrics=("optim", "optim_state_8bit", "optim_state_eligible", "optim_requested", "optim_fallbacks")),
    Rule("prequantized_roundtrip", "4-bit model saved and reloaded: same logits (max |d| == 0), every expert "
         "tensor (and every 4-bit router) still 4-bit", _ran("prequantized"), _prequantized_roundtrip,
         metrics=("prequantized_max_abs", "prequantized_experts_quantized", "prequantized_expert_tensors",
                  "prequantized_routers_quantized", "prequantized_routers_kept_wide",
                  "prequantized_routers_routers")),
    Rule("kl_adapter", f"KL(trained || base + reloaded adapter) <= {KL_ADAPTER_MAX:g}", _ran("adapter_reload"),
         _le("kl_adapter", KL_ADAPTER_MAX),
         metrics=("kl_adapter",)),
    Rule("kl_foreign", f"adapters published by other cells load (converted by the shims where needed) and reproduce "
         f"the publisher's logits: max KL <= {KL_FOREIGN_MAX:g}", _ran("foreign_adapters"),
         lambda c: _le("kl_foreign_max", KL_FOREIGN_MAX)(c)
         and c.get("metrics", {}).get("foreign_ok") == c.get("metrics", {}).get("foreign_total"),
         metrics=("kl_foreign_max", "foreign_ok", "foreign_total")),
    Rule("prequantized_v4", f"a 4-bit checkpoint saved by transformers 4.x loads with every expert tensor 4-bit and "
         f"reproduces 4.x's logits (max |d| <= {PREQUANTIZED_V4_MAX_ABS:g})", _ran("prequantized_v4"),
         lambda c: bool(c.get("metrics", {}).get("prequantized_v4_experts_4bit"))
         and _le("prequantized_v4_max_abs", PREQUANTIZED_V4_MAX_ABS)(c),
         metrics=("prequantized_v4_max_abs", "prequantized_v4_experts_4bit")),
    Rule("per_expert_adapter", "fused expert adapters trained by other cells (transformers 5.x) load where experts "
         "are per-expert modules (4.57; shims: after shims.convert_adapter(to='per_expert')), with LoRA on every "
         f"per-expert module, and reproduce the publisher's logits (max |d| <= {PER_EXPERT_MAX_ABS:g})",
         _ran("per_expert_adapters"), _per_expert_exact,
         metrics=("per_expert_max_abs", "per_expert_ok", "per_expert_total", "per_expert_lora_modules",
                  "per_expert_linear_modules")),
    # The merged logits' KL (one nf4 re-quantization of W + delta) is reported, not bounded: its size depends on the
    # model and on how sharp training made the adapter; "nothing accumulates" is what the rule checks exactly.
    Rule("rl_cycles_exact", "merge/unmerge cycles on 4-bit experts: after every unmerge the stored experts are "
         "bit-identical to before the first merge, every merge is exactly one fresh quantization of W + delta "
         "(nothing accumulates), and the adapter trained between cycles", _ran("rl_cycles"),
         lambda c: (lambda m: m.get("rl_max_unmerge_byte_diff") == 0 and m.get("rl_max_unmerge_absmax_diff") == 0
                    and m.get("rl_max_merged_byte_diff_vs_fresh") == 0 and bool(m.get("rl_adapter_moved"))
                    and (m.get("rl_expert_tensors") or 0) > 0)(c.get("metrics", {})),
         metrics=("rl_max_unmerge_byte_diff", "rl_max_unmerge_absmax_diff", "rl_max_merged_byte_diff_vs_fresh",
                  "rl_adapter_moved", "rl_expert_tensors")),
    Rule("samples_adapter", "greedy samples after adapter reload match the trained model's",
         _ran("adapter_reload"), _samples("samples_adapter"),
         metrics=("samples_adapter",)),
    Rule("serve_fp32", f"served by the engine (vLLM), the float32 export reproduces the trained model computing in "
         f"float32 (recipe: its float32 twin): KL over the whole vocabulary at every prompt position <= "
         f"{KL_EXPORT_FP32_MAX:g} (the float32 export bound) and the same greedy tokens",
         _ran("serve_merged"),
         lambda c: _le("kl_serve_fp32", KL_EXPORT_FP32_MAX)(c) and _samples("samples_serve_fp32")(c),
         metrics=("kl_serve_fp32", "samples_serve_fp32")),
    Rule("serve_as_transformers_save", "the engine serves the shims' exports exactly as it serves transformers' own "
         "save_pretrained of the same weights (float32: the export re-saved; bf16: the float32 export rounded to "
         "bf16): bit-identical prompt log-probabilities (max |d| == 0) and greedy tokens, so nothing in the folder "
         "beyond its tensors is read differently",
         _ran("serve_merged"),
         lambda c: (_le("serve_fp32_vs_resave_max_abs", 0.0)(c) and _le("serve_bf16_vs_resave_max_abs", 0.0)(c)
                    and _samples("samples_serve_fp32_vs_resave")(c) and _samples("samples_serve_bf16_vs_resave")(c)),
         metrics=("serve_fp32_vs_resave_max_abs", "serve_bf16_vs_resave_max_abs", "samples_serve_fp32_vs_resave",
                  "samples_serve_bf16_vs_resave")),
    Rule("check_adapter_predicts_engine", "for every adapter layout (fused as saved, per-expert converted), "
         "shims.check_adapter(engine='vllm') predicts what the engine's LoRA loader did, measured by comparing the "
         "expert LoRA it loaded with peft's deltas (loads / loads_with_option / refused / silently_ignored), and where "
         "it loads only with engine options, the options it names are those it loaded with",
         _ran("serve_adapters"), _adapter_outcomes_predicted,
         metrics=("serve_adapter_outcomes", "serve_adapter_predicted", "serve_adapter_options_predicted")),
)


def first_failed_stage(case: dict) -> tuple[str, dict] | None:
    for name, stage in case.get("stages", {}).items():
        if stage.get("status") not in ("ok", "skipped", "unavailable"):
            return name, stage
    return None


def judge(case: dict) -> tuple[str, list[str]]:
    """(verdict, reasons) for one case record."""
    stages = case.get("stages", {})
    if any(s.get("status") == "unavailable" for s in stages.values()):
        reason = next(s.get("reason", "") for s in stages.values() if s.get("status") == "unavailable")
        return NA, [reason]
    failed = first_failed_stage(case)
    reasons: list[str] = []
    verdict = PASS
    if failed:
        name, stage = failed
        err = stage.get("error", {})
        reasons.append(f"stage {name} {stage.get('status')}: {err.get('type', '')}: {err.get('message', '')}"[:300])
        verdict = ERROR if stage.get("status") in ABORTED else FAIL
    for rule in RULES:
        if rule.applies(case) and not rule.holds(case):
            reasons.append(f"rule {rule.name}: {rule.description}")
            if verdict == PASS:
                verdict = FAIL
    return verdict, reasons
