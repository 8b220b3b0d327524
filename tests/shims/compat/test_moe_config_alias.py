"""expert_count_alias: trl's load-balancing loss reads config.num_experts; granitemoe / phimoe name it otherwise."""

import pytest

pytestmark = pytest.mark.needs_ml

PHIMOE = dict(vocab_size=128, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
               initializer_range=0.2, tie_word_embeddings=False,
               output_router_logits=True)  # the load-balancing loss on (trl 1.16 turns it on itself, 1.4 follows this)


@pytest.fixture
def alias_status():
    import shims

    try:
        yield {s["name"]: s for s in shims.apply(only=["expert_count_alias"])}["expert_count_alias"]
    finally:
        shims.restore()


def test_the_alias_target_is_the_one_expert_count_of_a_class_with_an_aux_loss():
    import dataclasses

    from shims.compat.moe_config_alias import alias_target

    @dataclasses.dataclass
    class Local:
        output_router_logits: bool = False
        router_aux_loss_coef: float = 0.001
        num_local_experts: int = 8

    @dataclasses.dataclass
    class Both(Local):
        num_experts: int = 8

    @dataclasses.dataclass
    class NoAuxLoss:
        num_local_experts: int = 8

    @dataclasses.dataclass
    class Ambiguous(Local):
        n_routed_experts: int = 4

    assert alias_target(Local) == "num_local_experts"
    assert alias_target(Both) is None and alias_target(NoAuxLoss) is None and alias_target(Ambiguous) is None


def _train_one_step(model, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cases import tiny

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", gradient_checkpointing=False, disable_tqdm=True,
                     dataset_text_field="text", bf16=False, fp16=False,
                     # trl's own LM-loss path, the one that adds the aux loss from config.num_experts: opt-in on trl
                     # 1.4, a deprecated alias of the default fused LM head on 1.16
                     loss_type="chunked_nll")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": tiny.training_texts()[:4]}),
                         processing_class=tiny.build_tokenizer())
    return trainer.train().training_loss


def test_trl_trains_phimoe_with_its_load_balancing_loss(tmp_path, alias_status):
    """phimoe (granitemoe's forward itself fails with router logits on transformers 5.6.2). Natively trl stops at the first step (no num_experts); with the alias it trains, the aux loss on, and the
    alias reads the real expert count without being serialized."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import shims
    from shims.compat.moe_config_alias import trl_reads_num_experts

    if not trl_reads_num_experts():
        assert not alias_status["applied"] and "does not read" in alias_status["reason"], alias_status
        return
    assert alias_status["applied"], alias_status
    config = AutoConfig.for_model("phimoe", **PHIMOE)
    assert config.num_experts == config.num_local_experts == 4 and "num_experts" not in config.to_dict()
    torch.manual_seed(0)
    loss = _train_one_step(AutoModelForCausalLM.from_config(config), tmp_path / "on")
    assert math.isfinite(loss)

    shims.restore()
    config = AutoConfig.for_model("phimoe", **PHIMOE)
    torch.manual_seed(0)
    with pytest.raises(AttributeError, match="num_experts"):
        _train_one_step(AutoModelForCausalLM.from_config(config), tmp_path / "off")


def test_the_declared_config_classes_cover_every_one_trl_would_fail_on():
    """A new MoE config class that names its expert count otherwise shows up here (add it to _CONFIGS)."""
    from shims.compat.moe_config_alias import TARGETS, scan_affected, trl_reads_num_experts

    if not trl_reads_num_experts():
        pytest.skip("the installed trl does not read config.num_experts: no config class needs the alias")
    declared = {(t.module, t.qualname.rsplit(".", 1)[0]) for t in TARGETS}
    assert set(scan_affected()) <= declared
