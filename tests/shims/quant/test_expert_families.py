"""Expert stacks and routers found by STRUCTURE, whatever their names (issue 14, shims side).

Families beyond transformers' fused ``gate_up_proj`` / ``down_proj``, each from a tiny config built here:
- jetmoe: experts modules holding ONE 3D ``weight`` (E, out, in) each (``mlp.input_linear`` / ``output_linear``, also
  the attention experts ``self_attention.experts.*``); its routers are nn.Linear inside a gating module;
- inkling: shared experts holding 3D ``gate_proj`` / ``up_proj`` / ``down_proj`` (a partial module before: only the
  names the shims knew were 4-bit, and peft's LoRA on ``gate_proj`` was dropped); router rows = routed + shared;
- routers of other shapes: nn.Linear subclasses (phimoe, llama4), routers with per-expert statistics (laguna,
  ernie4_5_moe, deepseek_v4), routers inside a container (afmoe, hunyuan_v1_moe: bitsandbytes' own Linear4bit).
References are exact: the float model holding the 4-bit model's dequantized weights, and the same LoRA on both.
"""

import pytest

from conftest import q4_ids, q4_load, q4_reference, q4_requires_fused, saved_checkpoints, tiny_from_config

pytestmark = pytest.mark.needs_ml

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=False)
# Tiny configs as cases/discover.py derives them (transformers 5.24); an arch this transformers lacks is skipped.
CONFIGS = {
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=16, intermediate_size=24),
    "inkling_text": dict(head_dim=16, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, intermediate_size=48, layer_types=["hybrid_sliding", "hybrid"]),
    "afmoe": dict(head_dim=16, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                  sliding_window=16, intermediate_size=48, layer_types=["sliding_attention", "full_attention"]),
    "ernie4_5_moe": dict(moe_intermediate_size=24, moe_num_experts=4, moe_k=2, intermediate_size=48),
    "hunyuan_v1_moe": dict(head_dim=16, num_experts=4, moe_topk=2, intermediate_size=24),
    "laguna": dict(head_dim=16, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=4,
                   num_experts_per_tok=2, sliding_window=16, intermediate_size=48,
                   layer_types=["full_attention", "full_attention"]),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16, intermediate_size=24),
    "llama4_text": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, attention_chunk_size=16,
                        intermediate_size=24, layer_types=["chunked_attention", "full_attention"]),
    "deepseek_v4": dict(head_dim=16, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, sliding_window=16, q_lora_rank=32, qk_rope_head_dim=16,
                        index_head_dim=16, index_n_heads=2,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"]),
    "lara_mini": dict(head_dim=16, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=4,
                      num_experts_per_tok=2, sliding_window=16, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, eos_token_id=2,
                      layer_types=["linear_attention", "sliding_attention"]),
    # dbrx: experts flattened to 2D (E * F, H) per projection; built by hand (cases/discover.py's default-derived
    # config did not build at the time)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=128, initializer_range=0.2,
                 tie_word_embeddings=False, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}),
}
# Expert stacks per layer (module path under the layer -> stack names), as the model classes register them.
STACKS = {
    "jetmoe": {"mlp.input_linear": ("weight",), "mlp.output_linear": ("weight",),
               "self_attention.experts.input_linear": ("weight",),
               "self_attention.experts.output_linear": ("weight",)},
    "inkling_text": {"mlp.experts": ("gate_up_proj", "down_proj"),
                     "mlp.shared_experts": ("gate_proj", "up_proj", "down_proj")},
}
# The router of each arch's MoE layer (path under the layer) and who stores it in 4 bits.
ROUTERS = {
    "jetmoe": {"mlp.router.layer": "bnb", "self_attention.experts.router.layer": "bnb"},
    "dbrx": {"ffn.router.layer": "bnb"},
    "inkling_text": {"mlp.gate": "shims"},
    "afmoe": {"mlp.router.gate": "bnb"},
    "hunyuan_v1_moe": {"mlp.gate.wg": "bnb"},
    "ernie4_5_moe": {"mlp.gate": "shims"},
    "laguna": {"mlp.gate": "shims"},
    "phimoe": {"mlp.router": "shims"},
    "llama4_text": {"feed_forward.router": "shims"},
    "deepseek_v4": {"mlp.gate": "shims"},
}
_SHIMS = ("quantize_fused_experts", "quantize_moe_routers", "prequantized_experts_checkpoint", "peft_quantized_experts",
          "peft_merge_quantized_experts")


@pytest.fixture(scope="module")
def family_checkpoint(tmp_path_factory):
    return saved_checkpoints(tmp_path_factory, "family", _family_model)


def _family_model(model_type):
    """The tiny float model of ``model_type`` (CONFIGS), after one forward."""
    common = {} if model_type == "dbrx" else _COMMON  # dbrx names its sizes differently
    return tiny_from_config(model_type, check_forward=True, **common, **CONFIGS[model_type])


@pytest.fixture
def family_shims():
    import shims

    q4_requires_fused()
    shims.apply(only=_SHIMS)
    yield shims
    shims.restore()


def _layers(model):
    return model.transformer.blocks if hasattr(model, "transformer") else model.model.layers


def _layer_prefix(model) -> str:
    return "transformer.blocks" if hasattr(model, "transformer") else "model.layers"


def _moe_layers(model):
    """(index, layer) of the decoder layers holding an MoE block (some archs keep the first layer dense)."""
    return [(i, layer) for i, layer in enumerate(_layers(model))
            if any(n.endswith(("experts", "input_linear")) for n, _ in layer.named_modules())]


def _float_3d_tensors(module) -> list[str]:
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]


@pytest.mark.parametrize("model_type", sorted(STACKS))
def test_every_stack_of_an_experts_module_is_4bit(model_type, family_checkpoint, family_shims):
    from shims.quant import storage

    model = q4_load(family_checkpoint(model_type))
    layers = _moe_layers(model)
    assert layers
    for index, layer in layers:
        for path, names in STACKS[model_type].items():
            module = layer.get_submodule(path)
            assert storage.quantized_tensor_names(module) and set(storage.quantized_tensor_names(module)) == set(names), (
                f"layer {index} {path}: 4-bit {storage.quantized_tensor_names(module)}, expected {names}")
            assert _float_3d_tensors(module) == [], f"layer {index} {path}: float stacks left"
    counts = storage.expert_storage(model)
    expected = sum(len(n) for n in STACKS[model_type].values()) * len(layers)
    assert counts["expert_tensors"] == counts["quantized"] == expected
    assert counts["bytes"] / counts["bf16_bytes"] <= 0.3


@pytest.mark.parametrize("model_type", sorted(STACKS))
def test_forward_equals_the_dequantized_model(model_type, family_checkpoint, family_shims):
    import torch

    from cases.measure import keep_bnb_compute_dtype

    path = family_checkpoint(model_type)
    model = q4_load(path)
    keep_bnb_compute_dtype(model)  # bitsandbytes' CPU bf16 repack of a 4-output Linear4bit router fails (N % 64)
    ref = q4_reference(model, path)
    ids = q4_ids()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()


def _targets(model_type):
    return sorted(f"{path}.{name}" for path, names in STACKS[model_type].items() for name in names)


@pytest.mark.parametrize("model_type", sorted(STACKS))
def test_lora_on_every_stack_matches_the_float_model(model_type, family_checkpoint, family_shims):
    """Adapter keys equal the float model's (same ParamWrapper nesting), every targeted stack carries LoRA and
    trains, and the 4-bit model with the LoRA computes what its dequantized float twin with the same LoRA does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cases.measure import keep_bnb_compute_dtype

    path = family_checkpoint(model_type)
    model = q4_load(path)
    keep_bnb_compute_dtype(model)
    ref = q4_reference(model, path)
    targets = _targets(model_type)

    def config():
        return LoraConfig(r=4, target_modules=[], target_parameters=targets, init_lora_weights=False)

    torch.manual_seed(1)
    pq = get_peft_model(model, config())
    torch.manual_seed(1)
    pr = get_peft_model(ref, config())
    lora_q = {k: v for k, v in pq.state_dict().items() if "lora_" in k}
    lora_r = {k for k in pr.state_dict() if "lora_" in k}
    assert set(lora_q) == lora_r
    stacks = sum(len(n) for n in STACKS[model_type].values()) * len(_moe_layers(model))
    assert len(lora_q) == 2 * stacks  # lora_A and lora_B on every stack
    pr.load_state_dict(lora_q, strict=False)
    ids = q4_ids()
    with torch.no_grad():
        got, want = pq(input_ids=ids).logits, pr(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    pq.train()
    pq(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in pq.named_parameters() if "lora_" in n}
    assert len(grads) == 2 * stacks and all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("model_type", sorted(ROUTERS))
def test_routers_found_by_structure_are_4bit(model_type, family_checkpoint, family_shims):
    import torch
    from bitsandbytes.nn import Linear4bit

    from cases.measure import keep_bnb_compute_dtype
    from shims.quant import quant_router, storage

    path = family_checkpoint(model_type)
    model = q4_load(path)
    layers = _moe_layers(model)
    found = dict(quant_router.iter_routers(model))
    expected = {f"{_layer_prefix(model)}.{i}.{p}": who for i, _ in layers for p, who in ROUTERS[model_type].items()}
    assert set(found) == set(expected)
    for path_, who in expected.items():
        module = found[path_]
        if who == "bnb":
            assert isinstance(module, Linear4bit) and not storage.quantized_tensor_names(module)
        else:
            assert storage.quantized_tensor_names(module) == ("weight",)
    counts = quant_router.router_storage(model)
    assert counts["routers"] == counts["quantized"] == len(expected)
    keep_bnb_compute_dtype(model)
    ref = q4_reference(model, path)
    ids = q4_ids()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()


def test_lone_3d_tensor_and_conv_kernels_are_not_experts():
    """Structure, not "any 3D tensor": a single 3D tensor without an expert sibling (a bank of queries) and a
    Conv1d kernel (out, in/groups, k) are left alone; a module's 3D tensors of different leading sizes are no group."""
    import torch

    from shims.quant import storage

    class Bank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(torch.zeros(12, 4, 64))

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(4, 8, 64))
            self.b = torch.nn.Parameter(torch.zeros(3, 8, 64))

    parent = torch.nn.Module()
    parent.bank, parent.conv, parent.mixed = Bank(), torch.nn.Conv1d(64, 64, 4, groups=64), Mixed()
    assert list(storage.iter_expert_modules(parent)) == []


def test_single_stacks_with_expert_siblings_are_one_group():
    import torch

    from shims.quant import storage

    class Stack(torch.nn.Module):
        def __init__(self, *shape):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(*shape))

    parent = torch.nn.Module()
    parent.inner = torch.nn.Module()
    parent.inner.up, parent.inner.down = Stack(4, 48, 64), Stack(4, 64, 24)
    parent.alone = Stack(4, 8, 8)  # a sibling of `inner`, not of up/down
    assert [n for n, _ in storage.iter_expert_modules(parent)] == ["inner.up", "inner.down"]


@pytest.mark.parametrize("model_type", ["jetmoe", "inkling_text", "llama4_text"])
def test_prequantized_checkpoint_reloads_bit_exact(model_type, family_checkpoint, family_shims, tmp_path):
    """save_pretrained of the 4-bit model, from_pretrained of that directory: the same packed bytes and states, the
    same logits. llama4: transformers swaps fused experts for per-expert Linear4bit on a pre-quantized load (the
    reload failed with "normal_kernel_cpu" not implemented for 'Byte'); jetmoe / inkling: stacks named ``weight`` /
    ``gate_proj`` had no converter (size mismatch)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cases.measure import keep_bnb_compute_dtype
    from shims.quant import quant_router, storage

    model = q4_load(family_checkpoint(model_type))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    saved = {name: module for name, module in storage.iter_expert_modules(model)}
    loaded = {name: module for name, module in storage.iter_expert_modules(reloaded)}
    assert set(saved) == set(loaded) and saved
    for name, module in saved.items():
        assert storage.quantized_tensor_names(loaded[name]) == storage.quantized_tensor_names(module)
        for pname in storage.quantized_tensor_names(module):
            assert torch.equal(loaded[name].parametrizations[pname].original, module.parametrizations[pname].original)
            assert torch.equal(storage.dequantize_param(loaded[name], pname), storage.dequantize_param(module, pname))
    assert quant_router.router_storage(reloaded) == quant_router.router_storage(model)
    keep_bnb_compute_dtype(model)
    keep_bnb_compute_dtype(reloaded)
    ids = q4_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", sorted(STACKS))
def test_save_merged_equals_the_peft_model(model_type, family_checkpoint, family_shims, tmp_path):
    """shims.save_merged of the 4-bit model with LoRA on every stack: the float32 export computes what the PeftModel
    does. inkling's shared experts are one-expert stacks (1, out, in), whose delta peft computes as a plain Linear's
    and broadcasts; the export failed with "delta (64, 24) does not fit base (1, 64, 24)"."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cases.measure import keep_bnb_compute_dtype

    model = q4_load(family_checkpoint(model_type))
    keep_bnb_compute_dtype(model)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=_targets(model_type),
                                                  init_lora_weights=False)).eval()
    family_shims.save_merged(peft_model, tmp_path / "merged", dtype=torch.float32, tokenizer=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = q4_ids()
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()


def test_dbrx_flattened_stacks_are_4bit_reload_exactly_and_compute_the_dequantized_model(family_checkpoint,
                                                                                         family_shims, tmp_path):
    """dbrx keeps each projection of all experts as one 2D (E * F, H) parameter (``experts.mlp.w1`` / ``v1`` /
    ``w2``): the expert count comes from the config. All three are stored 4-bit, the forward equals the float model
    holding the dequantized weights, and a saved 4-bit checkpoint reloads bit-exact. (LoRA on them:
    tests/shims/lora/test_flat_expert_lora.py.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from cases.measure import keep_bnb_compute_dtype
    from shims.quant import storage

    path = family_checkpoint("dbrx")
    model = q4_load(path)
    found = {name: names for name, _, names in storage.iter_expert_stacks(model)}
    assert found == {f"transformer.blocks.{i}.ffn.experts.mlp": ("w1", "v1", "w2") for i in range(2)}
    for name in found:
        assert storage.quantized_tensor_names(model.get_submodule(name)) and set(
            storage.quantized_tensor_names(model.get_submodule(name))) == {"w1", "v1", "w2"}
    keep_bnb_compute_dtype(model)
    ref = q4_reference(model, path)
    ids = q4_ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.allclose(logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    keep_bnb_compute_dtype(reloaded)
    for name in found:
        for pname in ("w1", "v1", "w2"):
            assert torch.equal(reloaded.get_submodule(name).parametrizations[pname].original,
                               model.get_submodule(name).parametrizations[pname].original)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_a_partly_4bit_experts_module_is_an_error_and_lone_stacks_are_named():
    """The load's final check: an experts module is wholly 4-bit or wholly float (a module with one stack 4-bit and
    another float, the inkling bug, raises naming both); a 3D tensor that is no expert stack is listed."""
    import bitsandbytes  # noqa: F401  (skips without bitsandbytes via the module's needs_ml mark)
    import torch

    from shims.quant import storage
    from shims.quant.bnb_config import QuantSettings

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, shape in (("gate_proj", (1, 24, 64)), ("up_proj", (1, 24, 64)), ("down_proj", (1, 64, 24))):
                self.register_parameter(name, torch.nn.Parameter(torch.randn(*shape)))

    class Bank(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Parameter(torch.zeros(12, 4, 64))

    model = torch.nn.Module()
    model.shared, model.bank = Shared(), Bank()
    assert storage.check_whole_modules(model) == ["bank.query"]
    settings = QuantSettings("nf4", False, torch.float32, torch.uint8, 64)
    storage.quantize_expert_param(model.shared, "up_proj", settings)
    storage.quantize_expert_param(model.shared, "down_proj", settings)
    with pytest.raises(storage.ExpertQuantError, match=r"shared: \['gate_proj'\] float"):
        storage.check_whole_modules(model)
    storage.quantize_expert_param(model.shared, "gate_proj", settings)
    assert storage.check_whole_modules(model) == ["bank.query"]


def test_lara_mini_4bit_save_keeps_its_split_projections_unmerged_and_a_merged_one_is_refused(family_checkpoint,
                                                                                               family_shims, tmp_path):
    """lara_mini: transformers reverts the load-time split of ``linear_attn.in_proj`` (into in_proj_qkv / z / b / a)
    by concatenating them on save; on Linear4bit that merges their packed data AND their QuantState JSON into one key
    no loader reads (natively the reload fails). With the shims those modules keep their own names in the checkpoint
    and the reload is bit-exact; a checkpoint saved without them is refused naming that cause."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from cases.measure import keep_bnb_compute_dtype
    from shims.quant import storage

    def keys(path):
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k for k in f.keys() if ".linear_attn.in_proj" in k}

    path, ids = family_checkpoint("lara_mini"), q4_ids()
    model = q4_load(path)
    keep_bnb_compute_dtype(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "shims")
    saved = keys(tmp_path / "shims")
    assert "model.layers.0.linear_attn.in_proj_qkv.weight.quant_state.bitsandbytes__nf4" in saved
    assert not any(".linear_attn.in_proj.weight" in k for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shims", dtype=torch.float32).eval()
    keep_bnb_compute_dtype(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)

    family_shims.restore()  # the same save natively: transformers merges the four Linear4bit
    q4_load(path).save_pretrained(tmp_path / "native")
    family_shims.apply(only=_SHIMS)
    assert "model.layers.0.linear_attn.in_proj.weight.quant_state.bitsandbytes__nf4" in keys(tmp_path / "native")
    with pytest.raises(storage.ExpertQuantError, match=r"linear_attn\.in_proj\.weight\.quant_state.*not one saved"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)
