"""One DeepSeek-V3-sized MoE layer (256 experts, hidden 7168, expert width 2048): its gate_up stack has
256 x 4096 x 7168 = 7.5e9 elements, more than bitsandbytes' 4-bit kernels can count (a signed 32-bit element
count). Run through ``python -m cases.bench_depth huge`` (small dims by default, so CI runs it on CPU).

Checked, each against a reference that does not share the code under test:
  * storage: the shims' dequantization of every stack equals bitsandbytes' dequantization of each expert's own
    slice (per expert, far below 2**31 elements), bit for bit; also recorded is what one bitsandbytes call over a
    whole stack of that shape does, in a child process (the upstream limit, measured rather than assumed);
  * forward: the MoE block with 4-bit experts equals the same block holding those dequantized weights as plain
    bf16 parameters, bit for bit;
  * LoRA on the experts trains (loss per step, every lora_B moved);
  * export: every expert tensor ``shims.save_merged`` writes, reloaded by transformers, equals bf16(dequantized W +
    the fp32 LoRA delta written out from peft's convention), bit for bit.
"""

from __future__ import annotations

import math
import tempfile
import time
import zlib
from pathlib import Path

EXPERT_NAMES = ("gate_up_proj", "down_proj")


def deepseek_v3_config(args):
    from transformers import AutoConfig

    groups = 8 if args.experts % 8 == 0 and args.experts >= 64 else 1
    return AutoConfig.for_model(
        "deepseek_v3", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=1,
        first_k_dense_replace=0, n_routed_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate, n_shared_experts=1, intermediate_size=4 * args.moe_intermediate,
        n_group=groups, topk_group=max(1, groups // 2), num_attention_heads=args.heads,
        num_key_value_heads=args.heads, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.02)


def _fill(model, device) -> None:
    """N(0, 0.02) weights, generated per expert (no full-stack fp32 temporary), norms one; seeded by name."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            rows = p if p.dim() == 3 else p.unsqueeze(0)
            for e in range(rows.shape[0]):
                gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{name}/{e}".encode()))
                rows[e].copy_(torch.randn(rows[e].shape, generator=gen, device=device) * 0.02)


def _experts(model):
    return model.model.layers[0].mlp.experts


def per_expert_reference(experts, name: str):
    """Dequantize each expert's slice of the packed bytes with its own absmax (one bitsandbytes call per expert)."""
    import copy

    import bitsandbytes.functional as F
    import torch

    from shims.quant.storage import quantized_parametrization

    param = quantized_parametrization(experts, name)
    packed, state = experts.parametrizations[name].original, param.quant_state
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    count, shape = state.shape[0], tuple(state.shape[1:])
    rows, blocks = packed.shape[0] // count, absmax.numel() // count
    out = torch.empty(tuple(state.shape), dtype=state.dtype, device=packed.device)
    for e in range(count):
        one = copy.copy(state)
        one.absmax, one.shape, one.nested, one.state2, one.offset = (
            absmax[e * blocks:(e + 1) * blocks].float(), torch.Size([math.prod(shape)]), False, None, None)
        out[e] = F.dequantize_4bit(packed[e * rows:(e + 1) * rows], one).reshape(shape)
    return out


def whole_stack_probe(shape, device: str, timeout_s: float = 600) -> dict:
    """What one bitsandbytes call over a whole stack of ``shape`` does, run in a child process: bitsandbytes ends
    the process on a CUDA launch error. The child quantizes a random stack expert by expert and compares the
    single-call dequantization with each expert's own."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cases.bench_huge", device, *map(str, shape)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return {"exit": proc.returncode, "result": lines[-1][-300:] if lines else ""}


def _probe_main(device: str, *shape: str) -> None:
    import copy

    import bitsandbytes.functional as F
    import torch

    from shims.quant.storage import quantize_experts_chunked

    shape = tuple(int(d) for d in shape)
    stack = torch.empty(shape, dtype=torch.bfloat16, device=device)
    for e in range(shape[0]):
        stack[e].normal_(0, 0.02)
    packed, state = quantize_experts_chunked(stack, torch.bfloat16)
    del stack
    flat = copy.copy(state)
    flat.shape = torch.Size([math.prod(shape)])
    whole = F.dequantize_4bit(packed, flat).reshape(shape)
    rows, blocks = packed.shape[0] // shape[0], state.absmax.numel() // shape[0]
    wrong = 0
    for e in range(shape[0]):
        one = copy.copy(state)
        one.absmax, one.shape = state.absmax[e * blocks:(e + 1) * blocks], torch.Size([math.prod(shape[1:])])
        wrong += int((F.dequantize_4bit(packed[e * rows:(e + 1) * rows], one).reshape(shape[1:]) != whole[e]).sum())
    print("equal to the per-expert decode" if wrong == 0 else f"{wrong} of {whole.numel()} elements differ")


def huge_layer(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import shims
    from cases.bench_depth import bnb_config
    from shims.quant.storage import dequantize_param, quantize_model_experts

    shims.apply()
    device = "cuda" if args.device == "cuda" else "cpu"
    config = deepseek_v3_config(args)
    out = {"config": "huge-layer", "experts": args.experts, "hidden": args.hidden,
           "moe_intermediate": args.moe_intermediate}
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    _fill(model, device)
    experts = _experts(model)
    out["stack_elements"] = {n: getattr(experts, n).numel() for n in EXPERT_NAMES}
    t = time.perf_counter()
    quantize_model_experts(model, bnb_config(double_quant=False))  # the loaders' primitive, chunked per expert
    out["quantize_s"] = round(time.perf_counter() - t, 1)
    out["storage_exact"], reference = {}, {}
    for name in EXPERT_NAMES:
        ref = per_expert_reference(experts, name)
        out["storage_exact"][name] = bool(torch.equal(dequantize_param(experts, name), ref))
        reference[name] = ref
    out["whole_stack_one_bnb_call"] = whole_stack_probe(tuple(getattr(experts, EXPERT_NAMES[0]).shape), device)
    out["forward_max_abs"] = _forward_difference(model, config, reference, args)
    del reference
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=[],
                      target_parameters=[f"mlp.experts.{n}" for n in EXPERT_NAMES])
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    out["losses"] = losses
    out["lora_b_moved"] = all(bool(p.detach().abs().max() > 0) for n, p in peft_model.named_parameters()
                              if "lora_B" in n)
    peft_model.eval()
    with tempfile.TemporaryDirectory(dir=args.directory) as tmp:
        counts = shims.save_merged(peft_model, Path(tmp) / "merged", tokenizer=False)
        out["export"] = {k: v for k, v in counts.items() if k != "path"}
        out["export_mismatches"] = _export_mismatches(peft_model, Path(tmp) / "merged")
        out["export_exact"] = not any(out["export_mismatches"].values())
    return out


def _forward_difference(model, config, reference: dict, args) -> float:
    """max |MoE block with 4-bit experts - the same block of a plain bf16 model holding the dequantized weights|."""
    import torch
    from transformers import AutoModelForCausalLM

    device = reference[EXPERT_NAMES[0]].device
    with torch.device(device):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    block, plain_block = model.model.layers[0].mlp, plain.model.layers[0].mlp
    with torch.no_grad():
        for name, p in plain_block.named_parameters():
            owner, _, leaf = name.rpartition(".")
            p.copy_(reference[leaf] if owner == "experts" and leaf in reference else block.get_parameter(name))
        x = torch.randn(1, args.seq, args.hidden, generator=torch.Generator().manual_seed(1)).to(
            device=device, dtype=torch.bfloat16)
        return float((block(x).float() - plain_block(x).float()).abs().max())


def float32_delta(wrapper, adapter: str = "default", experts: tuple[int, int] | None = None):
    """Experts ``[start, stop)`` of the fused-expert LoRA delta in fp32, written out from peft's convention
    (ParamWrapper: lora_A (E*r, in) expert-major rows, lora_B (out, r*E) expert-fastest columns; "e o i" when peft
    swapped in/out for this module). peft's own get_delta_weight rounds its result to the base dtype, which would
    hide a wrong delta below bf16 noise."""
    import torch

    count = wrapper.num_experts
    start, stop = experts or (0, count)
    a = wrapper.lora_A[adapter].weight.float()
    b = wrapper.lora_B[adapter].weight.float()
    a = a.reshape(count, -1, a.shape[-1])[start:stop]
    b = b.reshape(b.shape[0], -1, count)[:, :, start:stop]
    layout = "o r e, e r i -> e o i" if wrapper._did_swap_in_out_features else "o r e, e r i -> e i o"
    return torch.einsum(layout, b, a) * wrapper.scaling[adapter]


def _export_mismatches(peft_model, folder: Path) -> dict:
    """Per expert tensor: elements where the export, reloaded by transformers (bf16), differs from
    bf16(dequantized W + the fp32 LoRA delta) (0: the export is exactly the trained model, rounded once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shims.quant.storage import dequantize_param

    wrappers = {m.parameter_name: m for m in peft_model.modules()
                if getattr(m, "parameter_name", None) in EXPERT_NAMES and hasattr(m, "lora_A")}
    device = next(iter(wrappers.values())).lora_B["default"].weight.device
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device})
    result = {}
    for name, wrapper in sorted(wrappers.items()):
        base, exported = dequantize_param(_experts(peft_model.get_base_model()), name), getattr(_experts(reloaded), name)
        result[name] = 0
        for start in range(0, base.shape[0], 16):  # 16 experts at a time: fp32 temporaries of a 7.5e9 stack are 28 GiB
            stop = min(start + 16, base.shape[0])
            want = (base[start:stop].float() + float32_delta(wrapper, experts=(start, stop))).to(torch.bfloat16)
            result[name] += int((exported[start:stop] != want).sum())
        del base, exported
    return result


if __name__ == "__main__":  # the child of whole_stack_probe: python -m cases.bench_huge DEVICE E D1 D2
    import sys

    _probe_main(*sys.argv[1:])
