"""Full-depth QLoRA benchmark: one configuration per process, printing one ``BENCH_RESULT`` JSON line.

    python -m cases.bench_depth build DIR [dims] [--format nf4|bf16]   write a random Qwen3-MoE-shaped checkpoint
    python -m cases.bench_depth run DIR --config NAME [--layers N]     load, QLoRA-train, (export); measure
    python -m cases.bench_depth huge [dims]                            one DeepSeek-V3-sized MoE layer, exactness

``build --format nf4`` writes the checkpoint directly in the 4-bit form that ``save_pretrained`` of a shims model
writes (attention ``Linear4bit`` keys, fused experts and routers as packed data + QuantState keys), one layer at a
time, so a 48-layer Qwen3-30B-A3B-shaped model (61 GB in bf16) needs about 10 GB of disk and never exists in bf16
as a whole. Every tensor's values come from a generator seeded by its name, so the nf4 and bf16 formats of one
build hold the same weights (tests/shims/test_bench_depth.py loads both and compares them bit for bit).

Configurations of ``run`` (harness/campaigns/bench_depth.py runs them side by side and writes reports/BENCH-depth.md):
  shims-levers   shims 4-bit checkpoint + the memory levers: gradient checkpointing, LoRA factors in bf16, paged
                 8-bit AdamW, the loss computed over token chunks (no full fp32 logits)
  shims-recipe   the tutorial recipe on the same checkpoint: prepare_model_for_kbit_training, fp32 LoRA factors,
                 paged 8-bit AdamW, the model's own loss (full logits)
  bf16-levers    the levers on bf16 base weights (built in memory from the same config; no checkpoint)
``--cap-gib`` limits the process to that much GPU memory (torch.cuda.set_per_process_memory_fraction), as a card of
that size would. ``--export DIR`` also writes ``shims.save_merged`` after training and records its host / GPU peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

CONFIGS = ("shims-levers", "shims-recipe", "bf16-levers", "native-levers", "e4b-levers", "unsloth-levers")
FORMATS = ("nf4", "bf16", "bf16-hub")  # bf16-hub: per-expert keys, as checkpoints on the hub (and 4.57) have them
QWEN3_30B_A3B = dict(hidden=2048, experts=128, top_k=8, moe_intermediate=768, vocab=151936, heads=32, kv_heads=4,
                     head_dim=128, layers=48)
WEIGHT_STD = 0.02
GIB = 1024 ** 3


def add_dim_flags(p: argparse.ArgumentParser, defaults: dict) -> None:
    for key, value in defaults.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["build", "run", "huge"])
    p.add_argument("directory", nargs="?")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--format", choices=FORMATS, default="nf4")
    p.add_argument("--double-quant", action="store_true", help="nested absmax statistics (build)")
    p.add_argument("--config", choices=CONFIGS)
    p.add_argument("--run-layers", type=int, default=None, help="load only the first N layers of the checkpoint")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed train steps, after 1 warm-up step")
    p.add_argument("--loss-chunk", type=int, default=512, help="tokens per loss chunk (levers)")
    p.add_argument("--cap-gib", type=float, default=None, help="GPU memory cap (per-process fraction)")
    p.add_argument("--export", default=None, help="write shims.save_merged here after training; measure its peaks")
    p.add_argument("--profile", action="store_true", help="after the timed steps, profile one more step: the ops "
                                                          "with the most device time")
    add_dim_flags(p, dict(hidden=64, experts=8, top_k=2, moe_intermediate=48, vocab=512, heads=4, kv_heads=2,
                          head_dim=16, layers=2))
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------- build
def qwen3_moe_config(args, layers: int | None = None):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=layers or args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        intermediate_size=4 * args.hidden, moe_intermediate_size=args.moe_intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=WEIGHT_STD)


def seeded_value(name: str, shape, device):
    """The bf16 value of tensor ``name``: ones for norms, N(0, 0.02) from a generator seeded by the name otherwise
    (the same on every run and in every format)."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen, device=device) * WEIGHT_STD).to(torch.bfloat16)


def bnb_config(double_quant: bool):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=double_quant)


def _skeleton(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def storage_kind(model, param_name: str) -> str:
    """How a shims 4-bit checkpoint stores ``param_name``: "experts" (fused 3D stack), "router" (shims 4-bit
    router), "linear4bit" (bitsandbytes converts every nn.Linear but the output head) or "float"."""
    import torch

    from shims.quant.quant_router import is_router_path
    from shims.quant.storage import EXPERT_WEIGHT_NAMES

    module_path, _, leaf = param_name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in EXPERT_WEIGHT_NAMES and getattr(module, leaf).dim() == 3:
        return "experts"
    if leaf == "weight" and is_router_path(model, module_path):
        return "router"
    if leaf == "weight" and isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
        return "linear4bit"
    return "float"


def packed_entries(name: str, kind: str, value, double_quant: bool) -> dict:
    """The checkpoint entries of one tensor: the bf16 value, or packed 4-bit data + its QuantState keys."""
    import bitsandbytes.functional as F
    import torch

    from shims.quant.storage import quantize_experts_chunked

    if kind == "float":
        return {name: value}
    if kind == "experts":
        packed, state = quantize_experts_chunked(value, torch.bfloat16, compress_statistics=double_quant)
    else:  # Linear4bit weights and 4-bit routers share bitsandbytes' own keys
        packed, state = F.quantize_4bit(value, compress_statistics=double_quant, quant_type="nf4")
    out = {name: packed}
    for stat, tensor in state.as_dict(packed=True).items():
        out[f"{name}.{stat}"] = tensor
    return out


def per_expert_entries(name: str, value) -> dict:
    """A fused (E, 2I, H) gate_up / (E, H, I) down stack as the per-expert Linear keys of the hub's Qwen3-MoE
    checkpoints (gate rows first in the fused stack, as transformers 5.x fuses them on load)."""
    prefix, _, leaf = name.rpartition(".")
    out = {}
    for e in range(value.shape[0]):
        if leaf == "gate_up_proj":
            gate, up = value[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
        else:
            out[f"{prefix}.{e}.down_proj.weight"] = value[e]
    return out


def _keep_readable_by_457(config_path: Path, experts: int) -> None:
    """transformers 5.x saves qwen3_moe's expert count only as ``num_local_experts``; 4.57 reads ``num_experts``
    (and silently falls back to 128). One checkpoint serves both, so it carries both keys."""
    config = json.loads(config_path.read_text())
    config["num_experts"] = experts
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, config_path)


def _save_shard(entries: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in entries.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def build(args) -> dict:
    """Write the checkpoint one decoder layer per shard (the rest in a last shard), then index and config."""
    from shims.files import staged_dir

    config = qwen3_moe_config(args)
    model = _skeleton(config)
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        key = f"layer{int(parts[2]):05d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append((name, tuple(param.shape)))
    weight_map, stored_bytes, t0 = {}, 0, time.perf_counter()
    with staged_dir(Path(args.directory), overwrite=True) as tmp:
        for i, (key, params) in enumerate(sorted(groups.items())):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            entries = {}
            for name, shape in params:
                value = seeded_value(name, shape, args.device)
                if args.format == "bf16-hub" and storage_kind(model, name) == "experts":
                    entries.update(per_expert_entries(name, value))
                else:
                    kind = storage_kind(model, name) if args.format == "nf4" else "float"
                    entries.update(packed_entries(name, kind, value, args.double_quant))
                del value
            _save_shard(entries, tmp / shard)
            stored_bytes += sum(t.numel() * t.element_size() for t in entries.values())
            weight_map.update({k: shard for k in entries})
        index = {"metadata": {"total_size": stored_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if args.format == "nf4":
            config.quantization_config = bnb_config(args.double_quant).to_dict()
        config.save_pretrained(tmp)
        _keep_readable_by_457(tmp / "config.json", args.experts)
        if args.format == "bf16-hub":  # peers' loaders (unsloth) also read a tokenizer
            from cases.tiny import build_tokenizer

            build_tokenizer().save_pretrained(tmp)
    return {"built": args.directory, "format": args.format, "layers": args.layers, "stored_bytes": stored_bytes,
            "params": sum(p.numel() for p in model.parameters()), "build_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------------- memory
class Memory:
    """Allocator peaks on CUDA; on CPU the resident set sampled every 20 ms (peaks of one phase, not lifetime)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device == "cuda"
        self._peak, self._stop = 0, None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def now(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else self.rss()

    @contextlib.contextmanager
    def phase(self):
        """Peak allocated (CUDA) and peak resident host memory within the block: ``{"gpu": .., "host": ..}``."""
        peaks = {}
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        stop, host = threading.Event(), [self.rss()]

        def sample():
            while not stop.wait(0.02):
                host[0] = max(host[0], self.rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield peaks
        finally:
            stop.set()
            thread.join()
            if self.cuda:
                self.torch.cuda.synchronize()
                peaks["gpu"] = self.torch.cuda.max_memory_allocated()
                peaks["gpu_reserved"] = self.torch.cuda.max_memory_reserved()
            peaks["host"] = max(host[0], self.rss())


# ----------------------------------------------------------------------------------------------------------- loss
def chunked_causal_lm_loss(model, input_ids, chunk_tokens: int):
    """Mean next-token cross entropy computed ``chunk_tokens`` positions at a time, each chunk's fp32 logits
    recomputed in the backward pass (torch.utils.checkpoint) instead of kept: the full (tokens x vocab) fp32 logits
    never exist. Same value as the model's own loss (tests/shims/test_bench_depth.py)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=input_ids).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    head = base.get_output_embeddings()

    def chunk_loss(h_chunk, t_chunk):
        return F.cross_entropy(head(h_chunk).float(), t_chunk, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(chunk_loss, h[start:stop], targets[start:stop], use_reentrant=False)
    return total / targets.numel()


# ------------------------------------------------------------------------------------------------------------ run
def _load(args, config_name: str):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    device_map = {"": 0} if args.device == "cuda" else {"": "cpu"}
    if config_name.startswith("bf16"):
        # bf16 base weights in memory (a 24-layer bf16 checkpoint would take 31 GB of disk and a minute to read);
        # the same config, N(0, 0.02) weights: speed and memory do not depend on the values.
        config = qwen3_moe_config(args, args.run_layers)
        with torch.device("cuda" if args.device == "cuda" else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model
    if config_name.startswith("e4b"):
        from experts4bit_qlora import load_moe_4bit_streaming

        model, _ = load_moe_4bit_streaming(args.directory, "cuda" if args.device == "cuda" else "cpu",
                                           torch.bfloat16, r=args.rank, alpha=2 * args.rank, quant_type="nf4")
        try:  # its fused grouped kernels for training (the [fast] extra, grouped-nf4-gemm), as its README advises
            from experts4bit_qlora import enable_fast_train

            model.e4b_fast_modules = enable_fast_train(model, dgrad=True)
        except ImportError as exc:
            model.e4b_fast_modules = f"not available: {exc}"
        return model
    if config_name.startswith("unsloth"):
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(model_name=args.directory, max_seq_length=args.seq,
                                                     dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True)
        return model
    if config_name.startswith("shims"):
        import shims

        shims.apply()
    kwargs = {"device_map": device_map}
    if args.run_layers:
        kwargs["num_hidden_layers"] = args.run_layers
    # the only signal for the keyword's name is the major version (4.x: torch_dtype; 5.x: dtype, torch_dtype deprecated)
    kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = torch.bfloat16
    if "quantization_config" not in json.loads((Path(args.directory) / "config.json").read_text()):
        kwargs["quantization_config"] = bnb_config(double_quant=True)  # a bf16 checkpoint, quantized at load
    return AutoModelForCausalLM.from_pretrained(args.directory, **kwargs)


def _lora(model, args, levers: bool, config_name: str):
    import torch

    """Attention + routed-expert LoRA (fused target_parameters on 5.x, per-expert Linear modules on 4.57). e4b's
    loader has already put its own LoRA on the experts and is trained as it comes (peft would freeze parameters
    that are not named like its own LoRA), so its row has no attention LoRA."""
    from peft import LoraConfig, get_peft_model

    from cases.pipeline import expert_targets

    if levers and not config_name.startswith("unsloth"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if config_name.startswith("e4b"):
        return model, sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    if config_name.startswith("unsloth"):  # its own LoRA entry point and gradient checkpointing
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, use_gradient_checkpointing="unsloth",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        return model, sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})
    targets = expert_targets(model)
    pattern = "|".join(f"(?:{p})" for p in [r".*\.(q_proj|k_proj|v_proj|o_proj)", *targets["modules"]])
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=pattern,
                        **({"target_parameters": targets["parameters"]} if targets["parameters"] else {}))
    # autocast_adapter_dtype=False keeps the factors in the base dtype (bf16) instead of peft's fp32 upcast; a 4-bit
    # base (4.57's Linear4bit) has no float dtype to keep, so the lever casts the factors to bf16 itself
    model = get_peft_model(model, config, autocast_adapter_dtype=not levers)
    if levers:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    return model, sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


def _optimizer(params, device: str):
    import bitsandbytes as bnb
    import torch

    from cases.pipeline import probe_bnb_optimizer

    for name, cls in (("paged_adamw_8bit", bnb.optim.PagedAdamW8bit), ("adamw_bnb_8bit", bnb.optim.AdamW8bit)):
        why = probe_bnb_optimizer(name, torch.device(device))
        if why is None:
            return cls(params, lr=1e-4), name
    return torch.optim.AdamW(params, lr=1e-4), f"adamw_torch (8-bit unavailable: {why})"


def run(args) -> dict:
    if args.config.startswith("unsloth"):
        import unsloth  # noqa: F401  (it patches transformers, so it must be imported first)
    import torch
    import transformers

    cuda = args.device == "cuda"
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    mem = Memory(args.device)
    levers = args.config.endswith("-levers")
    out = {"config": args.config, "layers": args.run_layers or args.layers, "seq": args.seq, "batch": args.batch,
           "rank": args.rank, "cap_gib": args.cap_gib, "transformers": transformers.__version__,
           "device_name": torch.cuda.get_device_name(0) if cuda else "cpu"}
    t0 = time.perf_counter()
    with mem.phase() as load_peak:
        model = _load(args, args.config)
    out.update(load_s=round(time.perf_counter() - t0, 1), resident_bytes=mem.now(), load_peak=load_peak)
    if args.config.startswith("shims"):
        from shims.quant.storage import expert_storage

        out.update({f"experts_{k}": v for k, v in expert_storage(model).items()})
    if args.config.startswith("e4b"):
        from experts4bit_qlora import verify_moe_4bit

        verify_moe_4bit(model, strict=True)  # raises if an expert stack stayed high precision
        out["e4b_fast_modules"] = model.e4b_fast_modules
    if args.config.startswith(("e4b", "unsloth")):
        from importlib.metadata import version

        dist = "experts4bit-qlora" if args.config.startswith("e4b") else "unsloth"
        out["peer"] = f"{dist} {version(dist)}"
    model, out["lora_dtypes"] = _lora(model, args, levers, args.config)
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    opt, out["optimizer"] = _optimizer(params, "cuda" if cuda else "cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(model.device)
    model.train()  # transformers checkpoints only in training mode
    autocast = contextlib.nullcontext() if levers else torch.autocast(model.device.type, dtype=torch.bfloat16)
    times, losses = [], []
    with mem.phase() as train_peak:
        for step in range(args.steps + 1):
            mem.torch.cuda.synchronize() if cuda else None
            t = time.perf_counter()
            loss = _train_step(model, ids, opt, levers, args.loss_chunk, autocast)
            mem.torch.cuda.synchronize() if cuda else None
            losses.append(float(loss.detach()))
            if step >= 1:
                times.append(time.perf_counter() - t)
    out.update(train_peak=train_peak, step_s=times, step_median_s=statistics.median(times),
               tokens_per_s=args.batch * args.seq / statistics.median(times), losses=losses)
    if args.profile:
        out["profile"] = _profile_step(lambda: _train_step(model, ids, opt, levers, args.loss_chunk, autocast), cuda)
    if args.config.startswith("shims"):
        out["dequant_layer_s"] = _dequant_layer_s(model, cuda)
    if args.export:
        del opt
        import shims

        model.eval()
        before, host_before = mem.now(), Memory.rss()
        t = time.perf_counter()
        with mem.phase() as export_peak:
            counts = shims.save_merged(model, args.export, overwrite=True, tokenizer=False)
        out["export"] = {"s": round(time.perf_counter() - t, 1), "peak": export_peak, "before_bytes": before,
                         "host_before_bytes": host_before, **{k: v for k, v in counts.items() if k != "path"},
                         "shard_bytes": _largest_shard(Path(args.export)), "layer_bytes": _bf16_layer_bytes(model)}
    return out


def _train_step(model, ids, opt, levers: bool, loss_chunk: int, autocast):
    with autocast:
        loss = chunked_causal_lm_loss(model, ids, loss_chunk) if levers else model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _profile_step(step, cuda: bool, top: int = 25) -> dict:
    """One train step under torch.profiler: wall time, total device (or CPU) self time, and the ``top`` ops by it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    torch.cuda.synchronize() if cuda else None
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize() if cuda else None
    wall = time.perf_counter() - t
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return {"wall_s": wall, "clock": "device" if cuda else "cpu",
            "total_ms": sum(getattr(e, key) for e in events) / 1000,
            "ops": [{"name": e.key[:90], "calls": e.count, "ms": round(getattr(e, key) / 1000, 3)}
                    for e in events[:top]]}


def _dequant_layer_s(model, cuda: bool, repeats: int = 5) -> float:
    """Median time to dequantize one decoder layer's expert stacks once (the fast LoRA path does it three times per
    step with checkpointing: forward, recompute, backward)."""
    import torch

    from shims.quant.storage import dequantize_param, iter_expert_modules, quantized_tensor_names

    _, module = next(iter(iter_expert_modules(model)))
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # under peft's wrappers
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize() if cuda else None
        t = time.perf_counter()
        for tensor in quantized_tensor_names(base):
            dequantize_param(base, tensor)
        torch.cuda.synchronize() if cuda else None
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _largest_shard(folder: Path) -> int:
    return max((p.stat().st_size for p in folder.glob("*.safetensors")), default=0)


def _bf16_layer_bytes(model) -> int:
    """bf16 bytes of one merged decoder layer (what an export holds per layer beyond a shard)."""
    from torch.nn.utils.parametrize import ParametrizationList

    from shims.quant.storage import quantized_parametrization, quantized_tensor_names

    total = 0
    for module_name, module in model.get_base_model().model.layers[0].named_modules():
        if isinstance(module, ParametrizationList) or "lora_" in module_name:
            continue  # packed ``original``: counted through its owner's logical shape below; LoRA is merged
        for name in quantized_tensor_names(module):
            total += 2 * math.prod(quantized_parametrization(module, name).logical_shape)
        for p in module.parameters(recurse=False):
            state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: its logical shape
            total += 2 * math.prod(state.shape if state is not None else p.shape)
    return total


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.action in ("build", "run") and not args.directory:
        print(f"error: {args.action} needs a directory", file=sys.stderr)
        return 2
    if args.action == "run" and not args.config:
        print("error: run needs --config " + "|".join(CONFIGS), file=sys.stderr)
        return 2
    if args.action == "huge":
        from cases.bench_huge import huge_layer

        result = huge_layer(args)
    else:
        result = build(args) if args.action == "build" else run(args)
    print("BENCH_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
