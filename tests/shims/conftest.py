"""Shared fixtures for tests/shims (sections owned by different engineers; append, do not reorder)."""


# ---- layout / export / peft_compat fixtures (tiny random MoE models and LoRA helpers) -----------------
import pytest as _pytest_lx

_LX_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
                  initializer_range=0.2)  # 0.2 so that the experts matter (see the facts note)
_LX_EXTRA = {
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, num_key_value_heads=4,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16),
    "glm4_moe": dict(intermediate_size=128, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1),
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "qwen3_5_moe_text": dict(moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=4,
                             num_experts_per_tok=2, linear_key_head_dim=16, linear_value_head_dim=16,
                             linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["linear_attention", "full_attention"]),
}
_LX_EXPERT_KEY = {"qwen3_moe": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size",
                  "glm4_moe": "moe_intermediate_size", "qwen3_5_moe_text": "moe_intermediate_size",
                  "mixtral": "intermediate_size", "gpt_oss": "intermediate_size"}


def lx_build_tiny_moe(model_type, dtype=None, seed=0, expert_dim=None, **overrides):
    """A tiny random MoE causal LM of ``model_type`` (skips when this transformers lacks it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(_LX_COMMON, **_LX_EXTRA[model_type])
    if expert_dim is not None:
        kw[_LX_EXPERT_KEY[model_type]] = expert_dim
    kw.update(overrides)
    try:
        cfg = AutoConfig.for_model(model_type, **kw)
    except (ValueError, KeyError) as exc:
        _pytest_lx.skip(f"transformers has no {model_type}: {exc}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def lx_fused_experts():
    """True when the installed transformers stores MoE experts as fused 3D parameters (5.x)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


@_pytest_lx.fixture
def tiny_moe():
    return lx_build_tiny_moe


@_pytest_lx.fixture
def lora_targets():
    """(target_modules, target_parameters) covering attention and every expert weight on this version."""

    def targets(model_type):
        attn = ["q_proj", "v_proj"] if model_type != "deepseek_v3" else ["q_b_proj", "o_proj"]
        if lx_fused_experts():
            return attn, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        if model_type == "mixtral":
            return attn + ["w1", "w2", "w3"], None
        return attn + ["gate_proj", "up_proj", "down_proj"], None

    return targets
