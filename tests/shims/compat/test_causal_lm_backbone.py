"""causal_lm_backbone: trl 1.16's fused LM head calls base_model, which Llama4ForCausalLM resolves to itself."""

import pytest

pytestmark = pytest.mark.needs_ml

LLAMA4_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=24, intermediate_size_mlp=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=16,
                   initializer_range=0.2, tie_word_embeddings=False)


@pytest.fixture
def backbone_status():
    import shims

    try:
        # llama4's config also needs the num_experts alias for trl's load-balancing loss (test_moe_config_alias.py)
        yield {s["name"]: s for s in shims.apply(only=["causal_lm_backbone", "expert_count_alias"])}["causal_lm_backbone"]
    finally:
        shims.restore()


def _train_one_step(tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cases import tiny

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama4_text", **LLAMA4_TEXT))
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
                     dataset_text_field="text", bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": tiny.training_texts()[:4]}),
                         processing_class=tiny.build_tokenizer())
    return model, trainer.train().training_loss


def test_trl_trains_llama4_text(tmp_path, backbone_status):
    """Natively the first step fails reading last_hidden_state off the causal LM's own output; with the patch the
    fused head gets the decoder's hidden states and the step trains."""
    import math

    import shims
    from shims.compat.causal_lm_backbone import trl_fused_head_uses_base_model

    if not trl_fused_head_uses_base_model():
        assert not backbone_status["applied"] and "no fused LM head" in backbone_status["reason"], backbone_status
        return
    assert backbone_status["applied"], backbone_status
    model, loss = _train_one_step(tmp_path / "on")
    assert math.isfinite(loss) and model.base_model is model.model
    assert model.base_model_prefix == "language_model"  # checkpoint loading keeps its prefix

    shims.restore()
    with pytest.raises(AttributeError, match="last_hidden_state"):
        _train_one_step(tmp_path / "off")


def test_the_declared_classes_cover_every_moe_causal_lm_whose_base_model_is_itself():
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from cases.discover import moe_model_types
    from shims.compat.causal_lm_backbone import TARGETS, backbone_missing, trl_fused_head_uses_base_model

    if not trl_fused_head_uses_base_model():
        pytest.skip("the installed trl's LM loss does not call base_model: no class needs the patch")
    declared = {(t.module, t.qualname.rsplit(".", 1)[0]) for t in TARGETS}
    found = set()
    for model_type in moe_model_types():
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if not name:
            continue
        # the class's own module: a config-only type (param2moe on 5.25) maps to another arch's class
        cls = getattr(transformers, name, None)
        if cls is not None and backbone_missing(cls):
            found.add((cls.__module__, name))
    assert found <= declared, found - declared
