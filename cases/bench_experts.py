"""Benchmark: 4-bit fused experts (moe-shims) vs bf16 on a qwen3_moe-shaped model.

Run with a cell's python:  PYTHONPATH=<repo> python cases/bench_experts.py --device cpu [--out bench.json]
Qwen3-30B-A3B dims on a GPU: --device cuda --hidden 2048 --experts 128 --layers 48 --moe-intermediate 768
--top-k 8 --vocab 151936 (needs the disk for one checkpoint write; weights are random).

Prints a markdown table: expert bytes and their ratio to bf16 (measured side by side), resident memory after load,
and the median LoRA train-step time (4-bit / bf16) after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=192)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed train steps (after 2 warm-up steps)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def build_checkpoint(args, directory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = max(1, args.hidden // 64)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=64,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=0.02)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory)
    del model


def resident_bytes(device):
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS (Linux reports KiB)


def load(path, device, quant):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, device_map=device)
    if quant is not None:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=(quant == "nf4+dq"))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return model, time.perf_counter() - t


def train_step_times(model, args):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    n_expert_lora = sum(1 for n, _ in pm.named_parameters() if "experts" in n and "lora_" in n)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    times = []
    for step in range(2 + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times), n_expert_lora


def run(args):
    import gc

    import shims
    from shims import quant

    shims.apply()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args, tmp)
        for mode in ("bf16", "nf4", "nf4+dq"):
            gc.collect()
            model, load_s = load(tmp, args.device, None if mode == "bf16" else mode)
            storage = quant.expert_storage(model)
            mem = resident_bytes(args.device)
            step_s, n_lora = train_step_times(model, args)
            rows.append(dict(mode=mode, load_s=load_s, expert_tensors=storage["expert_tensors"],
                             quantized=storage["quantized"], expert_bytes=storage["bytes"],
                             bf16_expert_bytes=storage["bf16_bytes"], resident_bytes=mem,
                             train_step_s=step_s, expert_lora_params=n_lora))
            del model
    base = rows[0]
    for r in rows:
        r["expert_ratio_vs_bf16"] = r["expert_bytes"] / base["expert_bytes"]
        r["step_ratio_vs_bf16"] = r["train_step_s"] / base["train_step_s"]
    return dict(args=vars(args), rows=rows, shims=shims.status())


def markdown(result) -> str:
    head = ("| mode | experts 4-bit | expert bytes | ratio vs bf16 | resident MiB | load s | train step s "
            "| step ratio | expert LoRA tensors |")
    lines = [head, "|" + " --- |" * 9]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['quantized']}/{r['expert_tensors']} | {r['expert_bytes']:,} | "
            f"{r['expert_ratio_vs_bf16']:.3f}x | {r['resident_bytes'] / 2**20:,.0f} | {r['load_s']:.2f} | "
            f"{r['train_step_s']:.3f} | {r['step_ratio_vs_bf16']:.2f}x | {r['expert_lora_params']} |")
    note = ("resident = peak RSS of the process so far (cpu; monotone) or torch.cuda.memory_allocated (cuda)")
    return "\n".join(lines) + "\n\n" + note


def write_json(path, data):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
