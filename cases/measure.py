"""What a case measures: logits divergence, greedy agreement, expert storage, LoRA gradients and memory."""

from __future__ import annotations

import resource

import torch
import torch.nn.functional as F

# The harness's own idea of an expert tensor and of a QuantState's size, deliberately not imported from shims/: a
# checker that took them from the code under test would stop seeing a shim that forgets a family of expert names
# (the expert_family_skipped mutation) or miscounts its bytes.
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    device = device_of(model)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    return out.logits.float().cpu()


def keep_bnb_compute_dtype(model) -> int:
    """Make bitsandbytes' Linear4bit compute in its compute dtype in eval mode too; returns how many it touched.

    On CPUs with AVX512-BF16, bitsandbytes (0.50.x) repacks a Linear4bit's weight on its first eval-mode forward
    and from then on multiplies in bf16 (input and absmax cast to bf16) whatever ``bnb_4bit_compute_dtype`` says.
    The cases compare fp32 models exactly, so they keep the declared compute dtype on every CPU (the flag is
    bitsandbytes' own attribute, read in ``Linear4bit.forward``); a missing attribute means that bitsandbytes has
    no such path and there is nothing to turn off.
    """
    touched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def disable_router_logits(model) -> None:
    """trl turns router logits (and the aux loss) on for training; evaluation and generation need neither,
    and the aux loss is not shape-safe with left padding on some versions."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False


def kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real tokens of KL(softmax(reference) || softmax(other)), in float64."""
    ref = F.log_softmax(reference.double().cpu(), dim=-1)
    oth = F.log_softmax(other.double().cpu(), dim=-1)
    per_token = (ref.exp() * (ref - oth)).sum(-1)
    m = mask.bool().to(per_token.device)
    return float(per_token[m].mean())


@torch.no_grad()
def greedy(model, tokenizer, texts: list[str], new_tokens: int) -> list[list[int]]:
    model.eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    device = device_of(model)
    out = model.generate(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    return out[:, enc["input_ids"].shape[1]:].tolist()


def agreement(reference: list[list[int]], other: list[list[int]]) -> str:
    same = sum(1 for a, b in zip(reference, other) if a == b)
    return f"{same}/{len(reference)}"


def is_expert_module(name: str) -> bool:
    return ".experts" in f".{name}" and "shared_expert" not in name


def quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = 0
    for attr in ("absmax", "code"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def expert_storage(model) -> dict:
    """Count routed-expert weight tensors, how many are 4-bit, and their bytes vs a bf16 copy.

    Seen natively: 3D fused float params (transformers 5.x) and per-expert nn.Linear / bnb Linear4bit
    (transformers 4.57). With shims on, the shim's own accounting (shims.storage.expert_storage) is used instead:
    its storage is the shim's business, and the count it reports is cross-checked by the verdict rules.
    """
    tensors = quantized = nbytes = bf16_bytes = 0
    for mod_name, module in model.named_modules():
        if not is_expert_module(mod_name):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if "lora" in pname or "bias" in pname:
                continue
            if p.__class__.__name__ == "Params4bit":
                state = getattr(p, "quant_state", None)
                logical = state.shape.numel() if state is not None else p.numel() * 2
                tensors += 1
                quantized += 1
                nbytes += p.numel() * p.element_size() + quant_state_bytes(state)
                bf16_bytes += logical * 2
            elif p.dim() >= 2 and p.dtype.is_floating_point and ("lora" not in mod_name):
                tensors += 1
                nbytes += p.numel() * p.element_size()
                bf16_bytes += p.numel() * 2
    return {"expert_tensors": tensors, "quantized": quantized, "bytes": nbytes, "bf16_bytes": bf16_bytes}


def lora_expert_params(model) -> dict[str, torch.nn.Parameter]:
    """LoRA factors that adapt routed experts (fused ParamWrapper or per-expert Linear)."""
    return {
        n: p for n, p in model.named_parameters()
        if "lora_" in n and is_expert_module(n) and p.requires_grad
    }


def grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(grads).norm())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
