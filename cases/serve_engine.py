"""Serve checkpoints and adapters with vLLM, in a process of its own (no shims, as a serving user runs it).

    python -m cases.serve_engine --request request.json --out result.json

The request (written by cases/serve.py) lists jobs; each job starts one ``vllm.LLM`` in this process (the first start
pays for imports and warm-up, later ones take seconds), records what the engine produced, and frees it:

- ``{"kind": "generate", "name", "model", "dtype", "prompts": [text], "new_tokens"}``: every prompt's token ids as
  the engine tokenized them, the log-probabilities of the whole vocabulary at every prompt position
  (``prompt_logprobs``, raw model log-softmax) and the greedy continuation.
- ``{"kind": "lora", "name", "model", "dtype", "llm_options", "adapters": [{"name", "path", "request_options"}],
  "buffers": path}``: each adapter added to the engine's LoRA manager (``LLMEngine.add_lora``: loaded, validated
  and copied into the experts' LoRA buffers, as a request would); a refusal is recorded with its message. The
  expert LoRA buffers each adapter left in the engine are written to ``buffers`` (safetensors) for the caller to
  compare with peft's. No request is run: vLLM's MoE LoRA kernels are Triton only, which its CPU build lacks.

A job that fails is recorded with its error and the others still run; the result file is written atomically.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

# the engine core in this process (its LoRA manager is then inspectable), a small KV cache, no GPU probing noise
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}
ENGINE_DEFAULTS = {"enforce_eager": True, "seed": 0}


def _error(exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "".join(tb[-6:])[-4000:]}


def _llm(job: dict, settings: dict, **extra):
    from vllm import LLM

    return LLM(model=job["model"], dtype=job["dtype"], **ENGINE_DEFAULTS, **settings, **extra)


def generate(job: dict, settings: dict) -> dict:
    from vllm import SamplingParams

    llm = _llm(job, settings)
    try:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, prompt_logprobs=vocab)
        outputs = llm.generate(job["prompts"], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    rows = []
    for out in outputs:
        # position 0 has no distribution (nothing before it); position i > 0: log p(. | tokens < i)
        dists = [[lp[t].logprob for t in range(vocab)] for lp in out.prompt_logprobs[1:]]
        rows.append({"prompt_token_ids": list(out.prompt_token_ids), "prompt_logprobs": dists,
                     "tokens": list(out.outputs[0].token_ids)})
    return {"vocab": vocab, "prompts": rows}


def _lora_manager(llm):
    """The engine's LoRA model manager (``.modules``: its LoRA-wrapped layers by module name), reached through the
    in-process engine core's worker."""
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    return worker.model_runner.lora_manager._adapter_manager


def _expert_buffers(manager, slot: int) -> dict:
    """Every experts layer's LoRA factors in ``slot``: ``<module>.<w13|w2>_lora_<a|b>.<k>`` as stored."""
    import torch

    out = {}
    for name, module in manager.modules.items():
        if not hasattr(module, "w13_lora_a_stacked"):
            continue
        for attr in ("w13_lora_a_stacked", "w13_lora_b_stacked", "w2_lora_a_stacked", "w2_lora_b_stacked"):
            for k, stacked in enumerate(getattr(module, attr)):
                out[f"{name}.{attr.removesuffix('_stacked')}.{k}"] = stacked[slot].to(torch.float32).clone()
    return out


def lora(job: dict, settings: dict) -> dict:
    from safetensors.torch import save_file
    from vllm.lora.request import LoRARequest

    ranks = [a.get("rank", 8) for a in job["adapters"]]
    llm = _llm(job, settings, enable_lora=True, max_loras=1, max_lora_rank=max(ranks), **job.get("llm_options", {}))
    results, tensors = {}, {}
    try:
        manager = _lora_manager(llm)
        for number, adapter in enumerate(job["adapters"], start=1):
            request = LoRARequest(adapter["name"], number, adapter["path"], **adapter.get("request_options", {}))
            try:
                llm.llm_engine.add_lora(request)
            except ValueError as exc:  # how the engine's LoRA validation refuses an adapter; the message is the result
                results[adapter["name"]] = {"status": "refused", "error": _error(exc)}
                continue
            slot = manager.lora_index_to_id.index(number)
            buffers = _expert_buffers(manager, slot)
            tensors.update({f"{adapter['name']}/{k}": v for k, v in buffers.items()})
            results[adapter["name"]] = {"status": "loaded", "buffers": sorted(buffers)}
            llm.llm_engine.remove_lora(number)
    finally:
        del llm
        gc.collect()
    if tensors:
        tmp = Path(job["buffers"]).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, job["buffers"])
    return {"adapters": results}


JOBS = {"generate": generate, "lora": lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    request = json.loads(Path(args.request).read_text(encoding="utf-8"))
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    import vllm

    result = {"vllm": vllm.__version__, "jobs": {}}
    for job in request["jobs"]:
        start = time.perf_counter()
        try:
            record = JOBS[job["kind"]](job, request.get("settings", {}))
        except Exception as exc:  # one job's failure is its result; the next job still runs (the caller reads it)
            record = {"error": _error(exc)}
        record["seconds"] = round(time.perf_counter() - start, 2)
        result["jobs"][job["name"]] = record
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
