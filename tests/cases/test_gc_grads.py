"""The gc_grads stage compares two training forwards: with a router that samples in training mode (phimoe's
sparsemixer) both must see the same random draws, or checkpointing looks wrong when it is not."""

import pytest

pytestmark = pytest.mark.needs_ml

PHIMOE = dict(vocab_size=128, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
              initializer_range=0.2, tie_word_embeddings=False)


def _case(model):
    import torch

    from cases.pipeline import Case, CaseSpec

    spec = CaseSpec(arch="phimoe", model_type="phimoe", quant="bf16", arch_common={}, arch_config={}, attention=[],
                    quant_spec={}, run={}, shims_on=False, cache_dir="", work_dir="")
    ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    return Case(spec, model=model, batch={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.fixture
def phimoe_lora():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("phimoe", **PHIMOE))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def test_checkpointing_gives_the_same_gradients_under_a_sampling_router(phimoe_lora):
    import torch

    case = _case(phimoe_lora)
    with_gc, calls_gc = case._first_step_grads(checkpointing=True)
    without_gc, calls_plain = case._first_step_grads(checkpointing=False)
    assert calls_gc == 2 and calls_plain == 1  # checkpointing did recompute the layer
    assert with_gc.keys() == without_gc.keys() and with_gc
    assert all(torch.equal(with_gc[n], without_gc[n]) for n in with_gc)


def test_the_router_does_sample_in_training_mode(phimoe_lora):
    """Why the stage seeds: two unseeded training forwards of this model differ (so the equality above is not
    vacuous, and without the seed the stage failed natively with max |d| 4.6e-3)."""
    import torch

    ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = (phimoe_lora(input_ids=ids).logits for _ in range(2))
    assert not torch.equal(first, second)
