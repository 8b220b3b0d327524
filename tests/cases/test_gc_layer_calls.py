"""The gc_grads stage counts how often the first MoE layer ran (checkpointing recomputes it: twice, once without).
gemma4 keeps its router and experts in the decoder layer itself, and transformers 5.24 checkpoints a layer's
``forward``, not its ``__call__``: a hook on the layer runs once either way, so the count must come from inside the
layer (the experts module). Counting the layer made gemma4's rows fail with 1 call vs 1 while checkpointing worked."""

import pytest

pytestmark = pytest.mark.needs_ml

GEMMA4_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                   initializer_range=0.2, tie_word_embeddings=False, enable_moe_block=True, num_experts=4,
                   top_k_experts=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                   hidden_size_per_layer_input=0)


def _case(model):
    import torch

    from cases.pipeline import Case, CaseSpec

    spec = CaseSpec(arch="gemma4_text", model_type="gemma4_text", quant="bf16", arch_common={}, arch_config={},
                    attention=[], quant_spec={}, run={}, shims_on=False, cache_dir="", work_dir="")
    ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return Case(spec, model=model, batch={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.fixture
def gemma4_lora():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "gemma4_text" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no gemma4_text")
    config = AutoConfig.for_model("gemma4_text", **GEMMA4_TEXT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if not any(name.endswith(".experts") for name, _ in model.named_modules()):
        pytest.skip("this transformers' gemma4_text builds no experts module")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_the_counted_module_runs_inside_the_checkpointed_layer(gemma4_lora):
    from cases.pipeline import first_experts_module

    counted = first_experts_module(gemma4_lora)
    layer = gemma4_lora.get_submodule("base_model.model.model.layers.0")
    assert counted is not layer and any(m is counted for m in layer.modules())


def test_checkpointing_recomputes_gemma4s_moe_layer(gemma4_lora):
    import torch

    case = _case(gemma4_lora)
    with_gc, calls_gc = case._first_step_grads(checkpointing=True)
    without_gc, calls_plain = case._first_step_grads(checkpointing=False)
    assert (calls_gc, calls_plain) == (2, 1)
    assert with_gc.keys() == without_gc.keys() and any("experts" in n for n in with_gc)
    assert all(torch.equal(with_gc[n], without_gc[n]) for n in with_gc)
