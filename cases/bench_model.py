"""One benchmark configuration in one process (clean memory accounting), printing one JSON line.

    python -m cases.bench_model build DIR [dims]            write a random Qwen3-MoE-shaped bf16 checkpoint
    python -m cases.bench_model run DIR --config NAME [...] load, LoRA-train, generate; measure

Configurations: shims-nf4 (shims.apply() then a 4-bit load), bf16, native-nf4 (BitsAndBytesConfig without the
shims). Which transformers runs is decided by the interpreter that runs this file (harness/campaigns/bench.py starts one per
transformers version). Memory: on CUDA torch's allocator counters (allocated now / peak); on CPU the process's
resident set (now / peak), less what it held before loading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

CONFIGS = ("shims-nf4", "shims-nf4-peft-path", "bf16", "native-nf4", "shims-nf4-recipe", "native-nf4-recipe")
# -recipe: the QLoRA recipe (double quant, prepare_model_for_kbit_training with gradient checkpointing, bitsandbytes'
# paged 8-bit AdamW where it runs on the device, bf16 autocast), next to the plain rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["build", "run"])
    p.add_argument("directory")
    p.add_argument("--config", choices=CONFIGS)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=192)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden // 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default heads // 8, at least 1)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed train steps, after 2 warm-up steps")
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args(argv)


def build(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = args.heads or max(1, args.hidden // 64)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=heads, num_key_value_heads=args.kv_heads or max(1, heads // 8),
        head_dim=128 if args.hidden >= 1024 else 64,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(args.directory)
    _keep_readable_by_457(Path(args.directory) / "config.json", args.experts)
    return {"built": args.directory, "params": sum(p.numel() for p in model.parameters())}


def _keep_readable_by_457(config_path: Path, experts: int) -> None:
    """transformers 5.24 saves qwen3_moe's expert count only as ``num_local_experts``; 4.57 reads ``num_experts``
    (and silently falls back to 128). The one checkpoint serves both rows, so it carries both keys."""
    config = json.loads(config_path.read_text())
    if config.setdefault("num_experts", experts) != experts:
        raise ValueError(f"{config_path}: num_experts={config['num_experts']}, expected {experts}")
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_path)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Memory:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device == "cuda"
        self.base = 0 if self.cuda else _rss_bytes()

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else _rss_bytes() - self.base

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return self.torch.cuda.max_memory_allocated() if self.cuda else _peak_rss_bytes() - self.base

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _expert_storage(model, shims_on: bool) -> dict:
    if shims_on:
        from shims.quant import storage

        return storage.expert_storage(model)
    from cases.measure import expert_storage

    return expert_storage(model)


def _router_bytes(model, shims_on: bool) -> int:
    """Stored bytes of the MoE routers (``mlp.gate`` of this Qwen3-MoE-shaped model): Linear4bit on 4.57, a plain
    2D parameter on 5.x, which the shims store 4-bit."""
    if shims_on:
        from shims.quant import quant_router
        from shims.loader_generation import V5, transformers_loader

        if transformers_loader() == V5:
            return quant_router.router_storage(model)["bytes"]
    from cases.measure import quant_state_bytes

    total = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp.gate"):
            for p in module.parameters():
                total += p.numel() * p.element_size() + quant_state_bytes(getattr(p, "quant_state", None))
    return total


def _optimizer(params, recipe: bool, device):
    """(optimizer, label): AdamW; for the recipe the first bitsandbytes 8-bit AdamW that steps on ``device``."""
    import torch

    if recipe:
        import bitsandbytes as bnb

        from cases.pipeline import probe_bnb_optimizer

        for name, cls in (("paged_adamw_8bit", bnb.optim.PagedAdamW8bit), ("adamw_bnb_8bit", bnb.optim.AdamW8bit)):
            why = probe_bnb_optimizer(name, device)
            if why is None:
                return cls(params, lr=1e-4), name
        return torch.optim.AdamW(params, lr=1e-4), f"adamw_torch (8-bit unavailable: {why})"
    return torch.optim.AdamW(params, lr=1e-4), "adamw_torch"


def run(args) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    shims_on = args.config.startswith("shims-nf4")
    if shims_on:
        import shims

        names = [s["name"] for s in shims.status()]
        if args.config == "shims-nf4-peft-path":  # the same shims with peft's own LoRA path for the experts
            names.remove("fast_expert_lora")
        shims.apply(only=names)
    mem = Memory(args.device)
    kwargs = {"device_map": {"": 0} if args.device == "cuda" else {"": "cpu"}}
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs[dtype_key] = torch.bfloat16
    recipe = args.config.endswith("-recipe")
    if "nf4" in args.config:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=recipe)
    mem.reset_peak()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.directory, **kwargs)
    mem.sync()
    out = {"config": args.config, "transformers": transformers.__version__, "device": args.device,
           "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
           "load_s": round(time.perf_counter() - t0, 2), "resident_bytes": mem.now(), "load_peak_bytes": mem.peak(),
           "router_bytes": _router_bytes(model, shims_on),
           **{f"experts_{k}": v for k, v in _expert_storage(model, shims_on).items()}}

    from cases.pipeline import expert_targets

    if recipe:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = expert_targets(model)
    attention = r".*\.(q_proj|k_proj|v_proj|o_proj)"
    pattern = "|".join(f"(?:{p})" for p in [attention] + targets["modules"])
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=pattern,
                        **({"target_parameters": targets["parameters"]} if targets["parameters"] else {}))
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    device = "cuda" if args.device == "cuda" else "cpu"
    opt, out["optimizer"] = _optimizer(params, recipe, torch.device(device))
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if recipe
                else contextlib.nullcontext())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    model.train()
    times = []
    mem.reset_peak()
    for step in range(args.steps + 2):
        mem.sync()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mem.sync()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    out.update(train_step_s=statistics.median(times), train_peak_bytes=mem.peak(),
               trainable=sum(p.numel() for p in params))
    if shims_on:
        from shims.lora.fast_lora import expert_lora_paths

        applied = {st["name"] for st in shims.status() if st["applied"]}
        paths = expert_lora_paths(model) if "fast_expert_lora" in applied else {}
        out["fast_lora_modules"] = (f"{sum(1 for p in paths.values() if p.startswith('fast'))}/{len(paths)}"
                                    if paths else "off")
        out["fast_lora_paths"] = sorted(set(paths.values()))
    del opt
    model.eval()
    prompt = ids[:1, :16]
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)  # warm-up
        mem.sync()
        t0 = time.perf_counter()
        gen_out = model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False)
        mem.sync()
    new = gen_out.shape[1] - prompt.shape[1]
    out["gen_tokens_per_s"] = new / (time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.action == "run" and not args.config:
        print("error: run needs --config " + "|".join(CONFIGS), file=sys.stderr)
        return 2
    result = build(args) if args.action == "build" else run(args)
    print("BENCH_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
