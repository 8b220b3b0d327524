"""Benchmark: 4-bit fused experts (moe-shims) vs bf16 on a qwen3_moe-shaped model.

Run with a cell's python:  PYTHONPATH=<repo> python cases/bench_experts.py --device cpu [--out bench.json]
Qwen3-30B-A3B dims on a GPU: --device cuda --hidden 2048 --experts 128 --layers 48 --moe-intermediate 768
--top-k 8 --vocab 151936 (needs the disk for one checkpoint write; weights are random).

Prints a markdown table: expert bytes and their ratio to bf16 (measured side by side), resident memory after load,
and the median LoRA train-step time (4-bit / bf16) after warm-up.

--fast-lora: instead compares, side by side in one run, the 4-bit LoRA train step with shims' fast expert LoRA path
(shims.fast_lora) on (its automatic kernel: torch._grouped_mm where it runs), on with the per-expert loop kernel
forced (shims.fast_lora.KERNEL = "loop"), and off: median step time, peak memory growth during the steps (CPU: ru_maxrss of a fresh process
per mode; CUDA: torch.cuda.max_memory_allocated) and the exact bytes autograd saves for backward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


FAST_LORA_MODES = ("on", "loop", "off")  # fast path (auto kernel), fast path with the loop kernel forced, peft's path


def _timed_train_steps(pm, opt, ids, args) -> list[float]:
    """Seconds per LoRA train step, for args.steps steps after 2 warm-up steps (synchronized on CUDA)."""
    import torch

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
    return times


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
    p.add_argument("--fast-lora", action="store_true",
                   help="instead: 4-bit LoRA train step with shims' fast expert LoRA path on vs off (side by side)")
    p.add_argument("--fast-lora-worker", choices=FAST_LORA_MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
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
    times = _timed_train_steps(pm, opt, ids, args)
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


# ---- fast expert LoRA on vs off -----------------------------------------------------------------------------------
# Each mode runs in its own process so that CPU peak RSS (ru_maxrss, monotone per process) is comparable; on CUDA
# torch.cuda.max_memory_allocated is reset after load. "saved for backward" is the exact byte count of the tensors
# autograd keeps between forward and backward (unique storages, via torch.autograd.graph.saved_tensors_hooks): the
# quantity the fast path changes, measured the same way on every device.


def _saved_bytes(pm, ids):
    import torch

    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    pm.zero_grad()
    return sum(storages.values())


def fast_lora_worker(args):
    import resource

    import torch
    from peft import LoraConfig, get_peft_model

    import shims
    from shims import fast_lora

    shims.apply()
    fast_lora.ENABLED = args.fast_lora_worker != "off"
    fast_lora.KERNEL = "loop" if args.fast_lora_worker == "loop" else "auto"
    model, _ = load(args.checkpoint, args.device, "nf4")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    paths = sorted(set(fast_lora.expert_lora_paths(pm).values()))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    saved = _saved_bytes(pm, ids)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = _timed_train_steps(pm, opt, ids, args)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return dict(mode=args.fast_lora_worker, paths=paths, train_step_s=statistics.median(times),
                peak_growth_bytes=peak, saved_for_backward_bytes=saved)


def run_fast_lora(args):
    import subprocess
    import sys

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(args, tmp)
        for mode in FAST_LORA_MODES:
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--fast-lora-worker", mode, "--checkpoint", tmp,
                   "--out", out] + _shape_args(args)
            subprocess.run(cmd, check=True)
            with open(out) as fh:
                rows.append(json.load(fh))
    on, loop, off = rows
    return dict(args=vars(args), rows=rows, step_ratio=on["train_step_s"] / off["train_step_s"],
                loop_step_ratio=loop["train_step_s"] / off["train_step_s"],
                saved_ratio=on["saved_for_backward_bytes"] / off["saved_for_backward_bytes"],
                peak_ratio=(on["peak_growth_bytes"] / off["peak_growth_bytes"]) if off["peak_growth_bytes"] else None)


def _shape_args(args):
    out = []
    for name in ("device", "hidden", "experts", "layers", "moe_intermediate", "top_k", "vocab", "seq", "batch", "steps"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def markdown_fast_lora(result) -> str:
    memory = "cuda max_memory_allocated growth" if result["args"]["device"] == "cuda" else "peak RSS growth (ru_maxrss)"
    lines = [f"| fast expert LoRA | expert LoRA path | train step s | {memory} MiB | saved for backward MiB |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {', '.join(r['paths'])} | {r['train_step_s']:.3f} | "
                     f"{r['peak_growth_bytes'] / 2**20:,.1f} | {r['saved_for_backward_bytes'] / 2**20:,.1f} |")
    peak = "n/a" if result["peak_ratio"] is None else f"{result['peak_ratio']:.2f}x"
    lines.append(f"\non/off: step {result['step_ratio']:.2f}x, peak growth {peak}, "
                 f"saved for backward {result['saved_ratio']:.2f}x; loop/off: step {result['loop_step_ratio']:.2f}x")
    lines.append("peak growth = peak after the timed steps minus before them, each mode in a fresh process; "
                 "saved for backward = bytes autograd keeps between forward and backward (exact, any device)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.fast_lora_worker:
        write_json(args.out, fast_lora_worker(args))
        return
    if args.fast_lora:
        result = run_fast_lora(args)
        print(markdown_fast_lora(result))
        if args.out:
            write_json(args.out, result)
        return
    result = run(args)
    print(markdown(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
