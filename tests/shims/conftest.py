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
        # parameters only: like from_pretrained(dtype=...), buffers such as rotary inv_freq stay float32
        for param in model.parameters():
            param.data = param.data.to(dtype)
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


# ---- 4-bit experts fixtures (quant / forward / peft_experts / merge) -----------------------------------------
@_pytest_lx.fixture(autouse=True)
def bnb_computes_in_its_compute_dtype(monkeypatch):
    """On CPUs with AVX512-BF16, bitsandbytes (0.50.x) runs an eval-mode Linear4bit through a bf16 kernel whatever
    its compute dtype (it decides in Linear4bit.__init__ from ``has_avx512bf16``). The exact fp32 comparisons
    here test the shims, so every Linear4bit built during a test computes in its declared dtype on any CPU."""
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return
    if hasattr(bnb_modules, "has_avx512bf16"):
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)


Q4_ARCHS = ("qwen3_moe", "mixtral", "gpt_oss")
_Q4_SHIM_NAMES = ("quantize_fused_experts", "peft_quantized_experts", "peft_merge_quantized_experts")


def q4_requires_fused():
    if not lx_fused_experts():
        _pytest_lx.skip("transformers 4.x: experts are per-expert nn.Linear, quantized natively (no fused experts)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        _pytest_lx.skip("bitsandbytes is not installed")


def saved_checkpoints(tmp_path_factory, prefix: str, build):
    """model_type -> directory holding ``build(model_type)`` saved with save_pretrained, built once per model type
    for the fixture that calls this (session- or module-scoped)."""
    cache = {}

    def checkpoint(model_type):
        if model_type not in cache:
            model = build(model_type)  # may skip the test: no folder then
            path = tmp_path_factory.mktemp(f"{prefix}_{model_type}")
            model.save_pretrained(path)
            cache[model_type] = str(path)
        return cache[model_type]

    return checkpoint


def tiny_from_config(model_type: str, check_forward: bool = False, **config):
    """The random float model of ``model_type`` built from ``config`` (seed 0). Skips the test where this
    transformers has no such model type or, with ``check_forward``, cannot run one forward of the tiny model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        built = AutoConfig.for_model(model_type, **config)
    except (ValueError, KeyError) as exc:
        _pytest_lx.skip(f"this transformers has no {model_type}: {exc}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(built)
    if check_forward:
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        except RuntimeError as exc:  # e.g. transformers 5.6.2's dbrx needs ffn_hidden_size == d_model
            _pytest_lx.skip(f"this transformers' {model_type} does not run its tiny float model: {exc}")
    return model


def saved_tiny(tmp_path_factory, model_type: str, check_forward: bool = False, **config) -> str:
    """Directory of :func:`tiny_from_config`'s model saved with save_pretrained."""
    model = tiny_from_config(model_type, check_forward, **config)  # may skip the test: no folder then
    path = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(path)
    return str(path)


@_pytest_lx.fixture(scope="session")
def q4_checkpoint(tmp_path_factory):
    """model_type -> directory of a saved tiny fp32 model (non-square: 2*I != H), built once per session."""
    import torch

    return saved_checkpoints(tmp_path_factory, "q4", lambda model_type: lx_build_tiny_moe(model_type,
                                                                                          dtype=torch.float32))


@_pytest_lx.fixture
def q4_shims():
    """The 4-bit expert shims applied for one test, restored afterwards."""
    import shims

    shims.apply(only=_Q4_SHIM_NAMES)
    yield shims
    shims.restore()


def q4_load(path, **bnb_kwargs):
    """Load ``path`` in 4-bit (fp32 compute unless overridden), fp32 model dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    kw.update(bnb_kwargs)
    return AutoModelForCausalLM.from_pretrained(path, dtype=kw.pop("dtype", torch.float32),
                                                quantization_config=BitsAndBytesConfig(**kw)).eval()


def q4_reference(qmodel, path):
    """The float model whose weights are exactly the dequantized weights of ``qmodel`` (attention and experts)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant import storage

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = module.weight
                ref.get_submodule(name).weight.copy_(BF.dequantize_4bit(w.data, w.quant_state))
            elif storage.quantized_tensor_names(module) and not hasattr(module, "base_layer"):
                for pname in storage.quantized_tensor_names(module):  # experts, and routers when those are 4-bit
                    getattr(ref.get_submodule(name), pname).copy_(storage.dequantize_param(module, pname))
    ref.set_experts_implementation(qmodel.config._experts_implementation)
    return ref


def q4_warmup_sizes(path) -> tuple:
    """(meta model, {param name: bytes per element}) as from_pretrained's GPU warm-up sizes a fresh bnb 4-bit load
    of ``path`` (the quantizer's param_element_size, after its model preprocessing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map={"": "cpu"})
    return model, {n: quantizer.param_element_size(model, n, p) for n, p in model.named_parameters()}


def q4_ids(seed=0, batch=2, length=12, vocab=128):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def q4_lora_pair(qmodel, ref, seed=1, r=4):
    """The same random LoRA (attention + expert target_parameters) on the 4-bit model and its float reference."""
    import torch
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                          init_lora_weights=False)

    torch.manual_seed(seed)
    pq = get_peft_model(qmodel, config())
    pr = get_peft_model(ref, config())
    lora = {k: v for k, v in pq.state_dict().items() if "lora_" in k}
    result = pr.load_state_dict(lora, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return pq, pr
