"""RL-style merge / unmerge cycles on 4-bit experts, measured: does the base drift, do merged logits track the adapter?

trl's online trainers (GRPO, online DPO ...) call ``merge_adapter()`` before generating and ``unmerge_adapter()``
after, every step, with an optimizer step on the LoRA in between. On 4-bit experts a merge re-quantizes
``W + delta`` (shims.merging.merge), so an unmerge that subtracts the delta again would leave ``W`` off its original grid
and the error would accumulate over hundreds of steps; shims.merging.merge instead restores the pre-merge packed bytes and
QuantState. :func:`cycle_drift` runs such a loop and reports what a harness stage needs to judge it:

- after every unmerge: how many packed bytes, and how much absmax, differ from before the first merge (exact: 0);
- every merged forward against the unmerged PeftModel forward with the same adapter (KL and max |d logits|). Not
  zero: the merged experts are ``nf4(W + delta)``. That error is bounded per element by half the widest gap between
  neighbouring 4-bit code values times the block's absmax (nf4: 0.152 x absmax); the loop checks that bound on the
  weights every cycle (``max_requant_error_ratio`` <= ``requant_error_ratio_bound``) and that the merged bytes are
  exactly one fresh quantization of the pre-merge W + the current delta (``max_merged_byte_diff_vs_fresh`` == 0),
  so the merged-vs-live KL is that of a single re-quantization at every cycle, never an accumulated one. Its size
  depends on the model and on how sharp the adapter has made the logits, so it is reported as measured.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..quant.storage import dequantize_param, quantized_parametrization

log = logging.getLogger("shims")


@dataclass
class _Tracked:
    """One 4-bit expert tensor under a LoRA: its wrapper, and its storage before the first merge."""

    wrapper: object
    packed: object  # the packed bytes
    absmax: object  # QuantState.absmax (uint8 codes when double-quantized, then also nested_absmax)
    nested_absmax: object | None
    weight: object  # dequantized, float32

    @property
    def base(self):
        return self.wrapper.get_base_layer()

    @property
    def name(self) -> str:
        return self.wrapper.parameter_name


def cycle_drift(model, steps: int = 200, input_ids=None, optimizer=None, lr: float = 1e-2, adapter: str = "default",
                train: bool = True, seed: int = 0) -> dict:
    """Run ``steps`` cycles of merge_adapter -> forward -> unmerge_adapter (-> optimizer step on the LoRA) on a
    PeftModel with shim 4-bit experts, and return the worst drift seen.

    ``input_ids``: the batch used for every forward and training step (default: a fixed random batch of 2 x 12).
    ``optimizer``: over the LoRA parameters (default Adam, ``lr``); ``train=False`` keeps the adapter fixed.
    The model's LoRA weights are trained in place: run it on a model you can throw away.

    Returns {"cycles", "expert_tensors", "max_unmerge_byte_diff" (packed bytes differing from before the first merge,
    summed over expert tensors, worst cycle), "max_unmerge_absmax_diff", "max_merged_kl" (KL(unmerged || merged),
    mean over tokens, worst cycle), "first_merged_kl", "last_merged_kl", "max_merged_logit_diff",
    "max_merged_byte_diff_vs_fresh" (merged packed bytes differing from one fresh quantization of the pre-merge W +
    the current delta: 0 when nothing accumulates), "max_requant_error_ratio" (|merged W - (W + delta)| / block
    absmax, worst element), "requant_error_ratio_bound"
    (half the widest 4-bit code gap), "adapter_moved", "seconds"}.
    """
    import torch

    tracked = _track(model)
    if not tracked:
        raise ValueError("no LoRA on a shim-quantized 4-bit expert tensor in this model: nothing to cycle")
    if input_ids is None:
        input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    lora = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    if train and optimizer is None:
        optimizer = torch.optim.Adam(lora, lr=lr)
    before = [p.detach().clone() for p in lora]
    bound = requant_error_ratio_bound(_quant_type(tracked[0]))
    stats = {"max_unmerge_byte_diff": 0, "max_unmerge_absmax_diff": 0.0, "max_merged_kl": 0.0,
             "max_merged_logit_diff": 0.0, "max_requant_error_ratio": 0.0, "max_merged_byte_diff_vs_fresh": 0}
    kls = []
    start = time.perf_counter()
    for step in range(steps):
        kl, logit_diff, ratio, fresh_diff = _merged_vs_live(model, tracked, input_ids, adapter)
        kls.append(kl)
        byte_diff, absmax_diff = _storage_diff(tracked)
        _update_max(stats, max_unmerge_byte_diff=byte_diff, max_unmerge_absmax_diff=absmax_diff, max_merged_kl=kl,
                    max_merged_logit_diff=logit_diff, max_requant_error_ratio=ratio,
                    max_merged_byte_diff_vs_fresh=fresh_diff)
        if byte_diff or absmax_diff:
            log.warning("merge cycle %d: base expert storage differs after unmerge (%d bytes, absmax %.3g)",
                        step, byte_diff, absmax_diff)
        if train:
            _train_step(model, optimizer, input_ids)
    moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, lora))
    return {"cycles": steps, "expert_tensors": len(tracked), **stats, "first_merged_kl": kls[0] if kls else 0.0,
            "last_merged_kl": kls[-1] if kls else 0.0, "requant_error_ratio_bound": bound, "adapter_moved": moved,
            "seconds": time.perf_counter() - start}


def requant_error_ratio_bound(quant_type: str = "nf4") -> float:
    """Half the widest gap between neighbouring values of bitsandbytes' 4-bit code (its own table): rounding to the
    nearest code moves a value by at most that times its block's absmax."""
    import bitsandbytes.functional as F

    code = F.get_4bit_type(quant_type, device="cpu").float().sort().values
    return float((code[1:] - code[:-1]).max() / 2)


def _track(model) -> list[_Tracked]:
    from peft.tuners.lora.layer import ParamWrapper

    out = []
    for module in model.modules():
        if not isinstance(module, ParamWrapper):
            continue
        base, name = module.get_base_layer(), module.parameter_name
        param = quantized_parametrization(base, name)
        if param is None:
            continue
        state = param.quant_state
        nested = state.state2.absmax.clone() if state.nested else None
        out.append(_Tracked(module, base.parametrizations[name].original.detach().clone(), state.absmax.clone(),
                            nested, dequantize_param(base, name).float()))
    return out


def _quant_type(tracked: _Tracked) -> str:
    return quantized_parametrization(tracked.base, tracked.name).settings.quant_type


def _merged_vs_live(model, tracked, input_ids, adapter):
    """One merge / unmerge: (KL(live || merged), max |d logits|, worst re-quantization error / block absmax)."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        live = model(input_ids, use_cache=False).logits.float()  # no cache: hybrid archs refuse one here
        model.merge_adapter()
        try:
            checks = [_check_merged(t, adapter) for t in tracked]
            merged = model(input_ids, use_cache=False).logits.float()
        finally:
            model.unmerge_adapter()
    model.train(was_training)
    kl = torch.nn.functional.kl_div(merged.log_softmax(-1), live.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    ratio = max(ratio for ratio, _ in checks)
    fresh_diff = sum(diff for _, diff in checks)
    return kl.item(), (merged - live).abs().max().item(), ratio, fresh_diff


def _check_merged(tracked: _Tracked, adapter: str) -> tuple[float, int]:
    """(worst |merged W - (W_before + delta)| / block absmax, packed bytes differing from a fresh quantization of
    W_before + delta with the same settings): the merged storage must be exactly one re-quantization, whatever cycle."""
    import torch

    from ..quant.storage import quantize_experts_chunked

    param = quantized_parametrization(tracked.base, tracked.name)
    target = tracked.weight + tracked.wrapper.get_delta_weight(adapter).float()
    s = param.settings
    fresh, _ = quantize_experts_chunked(target, s.compute_dtype, blocksize=s.blocksize,
                                        compress_statistics=s.compress_statistics, quant_type=s.quant_type,
                                        quant_storage=s.quant_storage)
    stored = tracked.base.parametrizations[tracked.name].original
    fresh_diff = int((stored != fresh).sum()) if stored.shape == fresh.shape else stored.numel()
    error = (dequantize_param(tracked.base, tracked.name).float() - target).flatten()
    blocks = target.flatten()
    block = param.quant_state.blocksize
    pad = (-blocks.numel()) % block
    absmax = torch.nn.functional.pad(blocks.abs(), (0, pad)).reshape(-1, block).amax(1)
    per_element = absmax.repeat_interleave(block)[: blocks.numel()].clamp_min(torch.finfo(torch.float32).tiny)
    return (error.abs() / per_element).max().item(), fresh_diff


def _storage_diff(tracked) -> tuple[int, float]:
    """(packed bytes differing from before the first merge, max |absmax difference|), over every expert tensor."""
    byte_diff, absmax_diff = 0, 0.0
    for t in tracked:
        param = quantized_parametrization(t.base, t.name)
        now = t.base.parametrizations[t.name].original
        byte_diff += int((now != t.packed).sum()) if now.shape == t.packed.shape else now.numel()
        absmax_diff = max(absmax_diff, _max_abs_diff(param.quant_state.absmax, t.absmax))
        if t.nested_absmax is not None:
            absmax_diff = max(absmax_diff, _max_abs_diff(param.quant_state.state2.absmax, t.nested_absmax))
    return byte_diff, absmax_diff


def _max_abs_diff(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


def _train_step(model, optimizer, input_ids) -> None:
    model.train()
    loss = model(input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def _update_max(stats: dict, **values) -> None:
    for key, value in values.items():
        stats[key] = max(stats[key], value)
