"""Discover the MoE architectures of the installed transformers and derive a tiny config for each.

Runs inside a cell's venv (``python -m cases.discover --out FILE``). An architecture is an MoE when its modeling
module defines an experts class (``class ...Experts...(``), read from the library's own source files, not from a
list. Each one with a causal-LM head gets a tiny config derived from its config class's defaults: small dims, two
layers, four experts, two per token, ``initializer_range=0.2`` so a wrong expert shows, and an expert width of 24
against a hidden size of 64 (2 x 24 != 64, so a layout mistake cannot hide). Only attributes the defaults already
carry are changed (in nested sub-configs too), sizes that other sizes determine are recomputed, and what a config
validator refuses is repaired from its message ("x must match y"). The model is then sized on the meta device,
built on the CPU and run forward once, and its attention projections are read from its structure; where that fails,
other variants of the tiny sizes are tried, and whatever still fails says why in its row. A short table
(``OVERRIDES``) supplies sizes for the few archs whose default config does not build at all, each with its reason.

The output is the list of generated arch entries (the shape of ``[arch.*]`` in harness/matrix.toml, plus
``skip`` with a reason where no tiny model could be built).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path

EXPERTS_CLASS = re.compile(r"^class \w*Experts\w*\(", re.M)
MAX_PARAMS = 3_000_000  # a tiny config still larger than this kept a big dimension the rules below missed

HIDDEN, EXPERT_WIDTH, EXPERTS, TOP_K = 64, 24, 4, 2
# attribute -> tiny value, applied where the config class's defaults carry the attribute. The names are the ones
# transformers' config classes use (several spellings of one idea), not model types.
TINY = {
    "vocab_size": 128, "hidden_size": HIDDEN, "d_model": HIDDEN, "num_hidden_layers": 2, "num_layers": 2,
    "n_layers": 2, "num_attention_heads": 4, "n_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 128, "max_seq_len": 128, "initializer_range": 0.2, "tie_word_embeddings": False,
    # expert width (and the dense MLP width where the arch has one beside its experts)
    "moe_intermediate_size": EXPERT_WIDTH, "expert_intermediate_size": EXPERT_WIDTH, "ffn_hidden_size": EXPERT_WIDTH,
    "expert_ffn_hidden_size": EXPERT_WIDTH,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "shared_intermediate_size": 32,
    # expert count and routing
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_routed_experts": EXPERTS, "n_experts": EXPERTS, "num_experts_per_tok": TOP_K,
    "num_experts_per_token": TOP_K, "top_k_experts": TOP_K, "moe_topk": TOP_K, "moe_top_k": TOP_K, "moe_k": TOP_K, "top_k": TOP_K,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "decoder_sparse_step": 1, "moe_layer_freq": 1, "mlp_only_layers": [], "sliding_window": 16,
    "attention_chunk_size": 16,
    # composite archs: the adapters between a vision / audio encoder and the text model carry the hidden size
    "adapter_in_dim": HIDDEN, "adapter_input_size": HIDDEN, "adapter_out_dim": HIDDEN,
    # dense layers before the first MoE layer: none, so that both tiny layers route
    "first_k_dense_replace": 0, "num_dense_layers": 0, "num_dense_blocks": 0,
    # hybrids placing layer kinds by period (jamba): every layer routes, the second one attends (a hybrid cache
    # holding no attention layer cannot tell a sequence length: real models always have some)
    "expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 2, "attn_layer_offset": 1,
    # latent / linear / state-space / indexer attention dims
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1, "ssm_state_size": 8,
    "mamba_expand": 2, "n_groups": 1, "kv_channels": 16, "index_head_dim": 16, "index_n_heads": 2,
    # kolibri1_1 (5.25): at most the query heads of one key head (4 / 2 here)
    "index_num_heads": 1,
    # not index_topk: a sparse-attention indexer keeping fewer keys than a test sequence has is discontinuous (an
    # exact merge's float rounding flips its choice: dots3_note export KL 0.7); real configs (2048) keep them all
}
# without a separate moe width, the experts use intermediate_size; with one, intermediate_size is a dense MLP
DENSE_WIDTH = 48


def moe_model_types() -> list[str]:
    """Every model type whose model is an MoE, in the library's registry order: its modeling module defines an experts
    class, or (a config-only type such as param2moe on 5.25, whose auto mapping names another arch's model) the
    module of the causal-LM class it maps to does."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"

    def defines_experts(module: str) -> bool:
        source = root / module / f"modeling_{module}.py"
        return source.exists() and bool(EXPERTS_CLASS.search(source.read_text(encoding="utf-8")))

    found = []
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        if defines_experts(module):
            found.append(model_type)
        elif not (root / module / f"modeling_{module}.py").exists():
            borrowed = _causal_lm_module(model_type)
            if borrowed and defines_experts(borrowed):
                found.append(model_type)
    return found


def _causal_lm_module(model_type: str) -> str | None:
    """The models/ folder of the class the causal-LM auto mapping names for ``model_type`` (None without one)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, class_name, None) if class_name else None
    parts = getattr(cls, "__module__", "").split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "models" else None


def has_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


SOFTMAX_ATTENTION = re.compile(r"attention|attn")
LINEAR_KIND = re.compile(r"linear|mamba|conv|ssm")
EXPERT_KIND = re.compile(r"moe|sparse|expert")


def _layer_types(value: list) -> list:
    """Two layers keeping the arch's mix: the first two distinct layer kinds. Where the list mixes more kinds and
    those two hold no softmax attention, an attention kind and an experts kind instead (a hybrid cache without an
    attention layer cannot tell a sequence length; real models of these archs always attend somewhere)."""
    distinct = list(dict.fromkeys(value))
    first = (distinct + distinct)[:2] if distinct else value[:2]
    if distinct and all(isinstance(k, str) and LINEAR_KIND.search(k) for k in distinct):
        # defaults listing only linear-attention / state-space layers (granitemoehybrid: the attention layers of a
        # real checkpoint are in its config.json): the second layer attends, under transformers' standard kind name
        return [distinct[0], "full_attention"]
    if len(distinct) <= 2 or any(_softmax_attention(k) for k in first):
        return first
    attention = next((k for k in distinct if _softmax_attention(k)), None)
    experts = next((k for k in distinct if isinstance(k, str) and EXPERT_KIND.search(k)), None)
    if attention is None or experts is None:
        return first
    return sorted({attention, experts}, key=distinct.index)


def _softmax_attention(kind) -> bool:
    return isinstance(kind, str) and bool(SOFTMAX_ATTENTION.search(kind)) and not LINEAR_KIND.search(kind)


# expert counts under other spellings (moe_num_experts, longcat's zero_expert_num: extra identity experts that
# share the routed experts' stack), never the shared experts
# a switch that turns an arch's MoE block off by default (gemma4: enable_moe_block=False): a tiny model of an MoE
# arch without it would test no experts at all
MOE_SWITCH = re.compile(r"^(enable|use)_moe(_\w+)?$")
EXPERT_COUNT = re.compile(r"^(n|num|moe_num)_(local_|routed_)?experts?$|^\w+_expert_num$")
# per-layer lists of layer kinds (attention kinds, mlp kinds such as "dense" / "sparse") and their string forms
LAYER_KINDS = re.compile(r"^(\w+_)?layer_types$|^layers_block_type$|^hybrid_override_pattern$")


def _is_sub_config(key: str, value) -> bool:
    """A nested config (text_config of a composite arch, dbrx's attn_config / ffn_config): shrunk by the same rules."""
    return key.endswith("_config") and isinstance(value, dict) and key != "quantization_config"


def tiny_overrides(defaults: dict) -> dict:
    """The tiny values for the attributes this config carries (and its nested sub-configs, for composite archs)."""
    out = {k: v for k, v in TINY.items() if k in defaults}
    for key, value in defaults.items():
        if _is_sub_config(key, value):
            out[key] = {**value, **tiny_overrides(value)}
        elif LAYER_KINDS.match(key) and isinstance(value, (list, str)) and value:
            out[key] = _layer_types(value) if isinstance(value, list) else value[:2]
        elif isinstance(value, bool):
            if MOE_SWITCH.match(key) and not value:
                out[key] = True
            continue
        elif not isinstance(value, int):
            continue
        elif "vocab" in key and value > TINY["vocab_size"]:
            out[key] = TINY["vocab_size"]  # per-layer / padded vocabularies too
        elif key in ("pad_token_id", "bos_token_id", "eos_token_id") and value >= TINY["vocab_size"]:
            out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
        elif EXPERT_COUNT.match(key) and "shared" not in key:
            out[key] = EXPERTS
        elif key.endswith("intermediate_size") and key not in out and ("dense" in key or "mlp_only" in key):
            out[key] = DENSE_WIDTH  # a dense MLP's width beside the experts (ergo's first_dense_intermediate_size)
    if isinstance(defaults.get("per_layer_config"), dict):
        out["per_layer_config"] = {}  # keyed by layer index of the full-depth model
    if "intermediate_size" in defaults:
        has_moe_width = any(k in defaults for k in ("moe_intermediate_size", "expert_intermediate_size",
                                                     "ffn_hidden_size", "expert_ffn_hidden_size"))
        out["intermediate_size"] = DENSE_WIDTH if has_moe_width else EXPERT_WIDTH
    out.update(_derived(defaults, out))
    return out


def _derived(defaults: dict, out: dict) -> dict:
    """Sizes that other sizes determine, recomputed from the tiny values (a default derived from the full-size
    dims would contradict them)."""
    def value(key):
        return out.get(key, defaults.get(key))

    derived = {}
    if "qk_head_dim" in defaults and isinstance(value("qk_nope_head_dim"), int) \
            and isinstance(value("qk_rope_head_dim"), int):
        derived["qk_head_dim"] = value("qk_nope_head_dim") + value("qk_rope_head_dim")
    # A logit multiplier below 1 compensates the width (cohere: 0.0625 at hidden 8192; a random model's logits grow
    # with sqrt(hidden)). Kept as is at hidden 64 it leaves the logits ~11x smaller than the arch's, near uniform,
    # and the loss hardly falls in a short run: scaled with the width instead, never above 1.
    full, tiny = defaults.get("hidden_size"), value("hidden_size")
    scale = defaults.get("logit_scale")
    if isinstance(scale, float) and 0 < scale < 1 and isinstance(full, int) and isinstance(tiny, int) and full > tiny:
        derived["logit_scale"] = round(min(1.0, scale * math.sqrt(full / tiny)), 4)
    # Mamba-2 mixers: heads x head dim is the expanded inner width (config validators check it)
    if all(isinstance(value(k), int) for k in ("mamba_n_heads", "mamba_d_head", "mamba_expand", "hidden_size")):
        derived["mamba_n_heads"] = value("mamba_expand") * value("hidden_size") // value("mamba_d_head")
    return derived


def attention_projections(model) -> list[str]:
    """Leaf names of the nn.Linear layers under an attention module (the LoRA targets next to the experts)."""
    import torch

    names = set()
    attention_paths = [path for path, module in model.named_modules() if "Attention" in type(module).__name__]
    for path, module in model.named_modules():
        # a subclass with its own forward (deepseek_v4's grouped o_a_proj) is no plain projection: peft's Linear
        # LoRA would add an update of the wrong shape to it
        if not isinstance(module, torch.nn.Linear) or type(module).forward is not torch.nn.Linear.forward:
            continue
        # by path (self_attn, linear_attn, attention) or by the class of a parent (nemotron_h: "mixer")
        parent = path.rsplit(".", 1)[0]
        if re.search(r"(^|\.)(self_)?attn|attention(\.|$)", path) or parent in attention_paths:
            names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def _config_errors() -> tuple:
    """What building a config or model from a generated config may raise (config validators included)."""
    errors = [ValueError, TypeError, KeyError, AttributeError, AssertionError, RuntimeError, IndexError,
              ZeroDivisionError, NotImplementedError, ImportError]
    try:  # transformers 5.x configs are strict dataclasses validated by huggingface_hub
        from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

        errors += [StrictDataclassClassValidationError, StrictDataclassFieldValidationError]
    except ImportError:
        pass
    return tuple(errors)


# Constraints some archs impose on the tiny sizes (shapes that only clash in the forward), tried in turn when a
# variant is refused.
RETRIES = ({"num_key_value_heads": 4}, {"num_key_value_heads": 4, "head_dim": 16, "qk_rope_head_dim": 16,
                                        "qk_nope_head_dim": 16})
# What config validators demand, read from their messages: (message pattern, the sizes that satisfy it, computed
# from the (sub-)config being repaired). Applied wherever the config or a sub-config carries the attribute; then
# the build is tried again.
REPAIRS = (
    # "<attribute> must match <attribute>" (kv heads vs attention heads, an adapter's input width vs hidden_size)
    (re.compile(r"\b(?P<a>[a-z_]+) must (?:match|equal) (?P<b>[a-z_]+)\s*$", re.M),
     lambda c, m: {m["a"]: c[m["b"]]}),
    (re.compile(r"num_experts_per_tok=1\b"), lambda c, m: {"num_experts_per_tok": 1}),
    (re.compile(r"head_dim must equal qk_nope_head_dim \+ qk_rope_head_dim"),
     lambda c, m: {"head_dim": c["qk_nope_head_dim"] + c["qk_rope_head_dim"]}),
)
# Sizes no generic rule can supply: the config class's defaults do not build a model at all (no tiny size fixes
# that). Deep-merged into the derived overrides; the reason is recorded in the arch's entry. Keep this table short.
OVERRIDES = {
    "dbrx": ({"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
             "its default config does not build: DbrxAttention reads attn_config.rope_theta, which "
             "DbrxAttentionConfig no longer declares, and clamps with clip_qkv=None (torch refuses); released "
             "checkpoints carry both in attn_config (rope_theta 500000, clip_qkv 8)"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention"]},
                 "layer_types defaults to None and the config derives none (the kinds 'conv' / 'full_attention' "
                 "appear only in the modeling code; released checkpoints list them)"),
    "qwen4_exp": ({"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                   "indexer_budget": 8, "indexer_compress_ratio": 4}},
                  "its default layer_types include indexed_attention, whose QSA indexer sizes default to None (the "
                  "default config does not build); values chosen by the validator's rules (kv heads 1, budget "
                  "divisible by the compress ratio, rotary dims within the index head)"),
}
OVERRIDES["qwen4_exp_text"] = (OVERRIDES["qwen4_exp"][0]["text_config"], OVERRIDES["qwen4_exp"][1])
# leaf names peft's transformers-5 MoE remap reads as expert projections: not LoRA targets among attention layers
EXPERT_PROJECTION_NAMES = {"gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def with_fix(overrides: dict, fix) -> dict:
    """``overrides`` with ``fix`` (a dict, or a function of the (sub-)config giving one) set on the config and every
    nested sub-config, each only for the attributes it carries."""
    out = {k: with_fix(v, fix) if _is_sub_config(k, v) else v for k, v in overrides.items()}
    try:
        values = fix(out) if callable(fix) else fix
    except KeyError:  # this (sub-)config lacks a size the fix is computed from
        return out
    out.update({k: v for k, v in values.items() if k in out})
    return out


def repaired(overrides: dict, error: Exception) -> dict | None:
    """``overrides`` changed to satisfy the validator message in ``error``, or None when no repair applies (or it
    changes nothing)."""
    for pattern, fix in REPAIRS:
        match = pattern.search(str(error))
        if match:
            fixed = with_fix(overrides, functools.partial(fix, m=match))
            if fixed != overrides:
                return fixed
    return None


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def variants(defaults: dict, model_type: str = "") -> list[dict]:
    overrides = deep_merge(tiny_overrides(defaults), OVERRIDES.get(model_type, ({}, ""))[0])
    return [overrides] + [with_fix(overrides, fix) for fix in RETRIES]


def try_variant(model_type: str, overrides: dict):
    """(model, params) built from ``overrides`` after one forward pass, or ``(None, params)`` when too large."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **overrides)
    with torch.device("meta"):  # sized first: a dimension the rules missed must not fill the memory
        meta = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in meta.parameters())
    if params > MAX_PARAMS:
        big = max(meta.named_parameters(), key=lambda kv: kv[1].numel())
        return None, f"tiny config still has {params:,} parameters (largest: {big[0]} {tuple(big[1].shape)})"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # some shape clashes only show in the forward
        model(input_ids=torch.randint(0, TINY["vocab_size"], (2, 8)), use_cache=False)
    return model, params


def _build_repairing(model_type: str, overrides: dict):
    """(model, params, None, overrides) once a build succeeds, repairing what validators refuse;
    (None, None, error, overrides) when a refusal has no repair."""
    error = None
    for _ in range(len(REPAIRS) + 1):
        try:
            model, params = try_variant(model_type, overrides)
        except _config_errors() as exc:
            error, fixed = exc, repaired(overrides, exc)
            if fixed is None:
                break
            overrides = fixed
            continue
        return model, params, None, overrides
    return None, None, error, overrides


def derive(model_type: str) -> dict:
    """A generated arch entry for ``model_type``: its tiny config and attention names, or ``skip`` with why."""
    from transformers import AutoConfig

    entry = {"name": model_type, "model_type": model_type, "discovered": True}
    if not has_causal_lm(model_type):
        return {**entry, "skip": "no causal-LM head (not in AutoModelForCausalLM): its experts are not run here"}
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except _config_errors() as exc:
        return {**entry, "skip": f"default config does not build: {type(exc).__name__}: {str(exc)[:200]}"}
    if model_type in OVERRIDES:
        entry["override"] = OVERRIDES[model_type][1]
    error, overrides = None, {}
    for overrides in variants(defaults, model_type):
        model, params, error, overrides = _build_repairing(model_type, overrides)
        if error is not None:
            continue  # an arch whose tiny config this generic derivation cannot satisfy: the row says why
        if model is None:
            return {**entry, "skip": params, "config": overrides}
        attention = [n for n in attention_projections(model) if n not in EXPERT_PROJECTION_NAMES]
        return {**entry, "attention": attention, "config": overrides, "params": params}
    return {**entry, "skip": f"tiny config does not build: {type(error).__name__}: {str(error)[:200]}",
            "config": overrides}


def discover() -> list[dict]:
    return [derive(model_type) for model_type in moe_model_types()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated model types (default: every MoE type)")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    only = [m for m in args.only.split(",") if m]
    entries = [derive(m) for m in only] if only else discover()
    doc = {"transformers": transformers.__version__, "archs": entries}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"{len(entries)} MoE model types, {sum('skip' not in e for e in entries)} with a tiny model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
