from __future__ import annotations

import copy

import pytest

from harness.matrix import Cell, load_matrix
from harness.results import KIND, SCHEMA_VERSION


@pytest.fixture(scope="session")
def matrix():
    return load_matrix()


def passing_case(arch="qwen3_moe", quant="bf16") -> dict:
    """A case record as cases/run_cell.py writes it, with every stage ok and every rule satisfied."""
    stages = {s: {"status": "ok", "seconds": 0.1} for s in
              ("build", "load", "lora", "train", "save_adapter", "export", "merge", "export_reload",
               "adapter_reload", "all_linear" if quant == "bf16" else "prequantized")}
    metrics = {
        "experts_expert_tensors": 4, "experts_quantized": 4 if quant == "nf4" else 0,
        "experts_bytes": 20736 if quant == "nf4" else 73728, "experts_bf16_bytes": 73728,
        "loss_first": 6.5, "loss_last": 1.4, "loss_first3": 6.0, "loss_last3": 1.6, "grad_norm": 2.4,
        "expert_lora_grad_norm": 0.7, "expert_lora_A_moved": 4, "expert_lora_B_moved": 4,
        "expert_lora_A_total": 4, "expert_lora_B_total": 4, "kl_merged": 1e-12, "kl_base": 0.5, "samples_merged": "4/4",
        "export_applied": 24, "export_attempted": 24, "export_expert_tensors": 4, "export_quantized": 0,
        "all_linear_attention_targets": 8, "prequantized_max_abs": 0.0,
        "prequantized_experts_quantized": 4, "prequantized_expert_tensors": 4,
        "kl_export": 2e-6, "kl_export_fp32": 1e-9, "samples_export_fp32": "4/4", "export_rounding_max_abs": 0.0, "samples_export": "4/4", "kl_adapter": 0.0, "samples_adapter": "4/4",
    }
    four_bit = quant != "bf16"
    if four_bit:  # the gradient-checkpointing check runs on 4-bit cases
        stages["gc_grads"] = {"status": "ok", "seconds": 0.1}
        metrics.update(experts_quantized=4, experts_bytes=20736, gc_grad_tensors=24, gc_grad_max_abs=0.0,
                       gc_layer_calls=2, plain_layer_calls=1)
    recipe = quant == "nf4-recipe"
    if four_bit and not recipe:  # float32 compute: the fast expert-LoRA path is compared with peft's (stage fast_path)
        stages["fast_path"] = {"status": "ok", "seconds": 0.1}
        metrics.update(fast_path_modules=2, fast_path_experts=2, fast_path_calls=2, fast_path_calls_disabled=0,
                       fast_path_refused=[], fast_path_summands=700, fast_vs_peft_max_abs=3.6e-6,
                       fast_vs_peft_logit_max=8.8)
    if recipe:  # bf16 compute: the float32 export is exact against the float32 twin; bf16 KLs are only reported
        metrics.update(kl_export=1.2e-2, kl_export_fp32=1e-9, kl_export_fp32_vs_bf16=1.6e-2, train_layer_calls_per_step=2.0,
                       optim="paged_adamw_8bit", optim_requested="paged_adamw_8bit,adamw_bnb_8bit",
                       optim_fallbacks=[], optim_state_8bit=20, optim_state_eligible=20)
    return {"case": f"{arch}/{quant}", "arch": arch, "quant": quant, "four_bit": four_bit, "recipe": recipe,
            "stages": stages, "metrics": metrics}


def results_doc(cell: Cell, mode: str, cases: list[dict], status: str = "ran") -> dict:
    return {
        "kind": KIND, "schema": SCHEMA_VERSION, "cell": cell.as_dict(), "mode": mode, "status": status,
        "shims_version": "0.1.0", "machine": {"host": "test", "platform": "linux", "cpus": 2},
        "started": 1.8e9, "seconds": 10.0, "install": {"seconds": 1.0},
        "versions": {"transformers": cell.transformers, "peft": cell.peft, "trl": cell.trl, "torch": "2.13.0"},
        "environment": {"device": "cpu"}, "cases": copy.deepcopy(cases),
    }
