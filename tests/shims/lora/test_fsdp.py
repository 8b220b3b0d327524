"""FSDP2 QLoRA with 4-bit experts: 2 CPU processes (gloo) against a single-process run of the same data.

A tiny qwen3_moe is loaded 4-bit with the shims (``bnb_4bit_quant_storage=torch.bfloat16``, so the packed expert
data is a float tensor FSDP can shard), gets attention + expert LoRA, and each decoder layer and then the root are
wrapped with ``fully_shard``. Each rank trains on its half of a fixed batch; the single-process reference trains on
the whole batch. Equal sequence lengths and no padding make the mean of the two ranks' losses the full-batch loss
and FSDP's averaged gradients the full-batch gradients, so the runs must agree up to float32 reduction order.

The workers are this file run as a script (``python test_fsdp.py RANK WORLD PORT OUT CKPT``): a subprocess needs
no import of the test module by name, which ``torch.multiprocessing.spawn`` would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = 2
STEPS = 3
LR = 1e-2
# Measured on torch 2.13 CPU: loss 4.8e-7, LoRA 5.6e-7 (float32 reduction order of the gradient all-reduce),
# float32 merged weights 1.6e-7. A bf16 export differs by one bf16 ulp (3e-5), hence the float32 exports.
LOSS_BOUND = 1e-5
LORA_BOUND = 1e-5
MERGED_BOUND = 1e-5
WORKER_TIMEOUT_S = 300

REPO = Path(__file__).resolve().parents[3]

if __name__ != "__main__":  # the workers need none of the fixtures
    from conftest import q4_requires_fused


# ---- shared by the workers and the single-process reference ------------------------------------------------------


def _load_peft(path):
    """The model as the issue describes it: shims on, 4-bit with bf16 quant storage, attention + expert LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.float32))
    torch.manual_seed(1)  # the same LoRA A init in every process
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    return get_peft_model(model, config)


def _batch():
    import torch

    return torch.randint(0, 128, (2 * WORLD, 12), generator=torch.Generator().manual_seed(0))


def _train(model, ids) -> list[float]:
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _lora(state_dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items() if "lora_" in k}


def _packed(state_dict) -> dict:
    return {k: v.detach().clone() for k, v in state_dict.items() if k.endswith(".original")}


# ---- the worker ---------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, out: Path, ckpt: str) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import shims
    from shims.lora import fsdp
    from shims.merging.export import MergeError

    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S - 30, exit=True)  # a hung collective says where it hung
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shims.apply()
    model = _load_peft(ckpt)
    before = model.state_dict()
    initial_lora, initial_packed = _lora(before), _packed(before)
    unsharded_bytes = fsdp.local_expert_bytes(model)
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded_bytes = fsdp.local_expert_bytes(model)

    ids = _batch()[2 * rank: 2 * rank + 2]
    losses = torch.stack(_train(model, ids))
    dist.all_reduce(losses)  # the mean of the ranks' means: the full-batch loss (equal token counts)
    losses /= world

    # save_merged straight from the sharded model: the local shards do not have the logical shapes.
    try:
        shims.save_merged(model, out / f"direct_merged_{rank}", tokenizer=False)
        direct_merge_error = None
    except MergeError as exc:
        direct_merge_error = str(exc)

    full = fsdp.full_state_dict(model)
    fsdp.save_adapter(model, out / "adapter", state_dict=full)
    torch.save(dict(losses=losses, initial_lora=initial_lora, initial_packed=initial_packed, lora=_lora(full),
                    packed=_packed(full), unsharded_bytes=unsharded_bytes, sharded_bytes=sharded_bytes,
                    direct_merge_error=direct_merge_error), out / f"rank{rank}.pt")
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


# ---- the test -----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_gloo():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2: torch >= 2.6)
    except ImportError as exc:
        pytest.skip(f"this torch has no FSDP2 fully_shard: {exc}")


def _start_workers(out: Path, ckpt: str) -> list:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(WORLD), str(port), str(out), ckpt],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD)]
    return procs


def _wait_workers(procs) -> None:
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=WORKER_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outputs.append(proc.communicate()[0])
    failed = [(rank, p.returncode, o[-4000:]) for rank, (p, o) in enumerate(zip(procs, outputs)) if p.returncode]
    assert not failed, "\n\n".join(f"rank {r} exited {rc}:\n{o}" for r, rc, o in failed)


def _merged_tensors(directory) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.slow
def test_fsdp2_qlora_4bit_experts_matches_single_process(q4_checkpoint, tmp_path):
    q4_requires_fused()
    _require_gloo()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import shims
    from shims.lora import fsdp

    ckpt = q4_checkpoint("qwen3_moe")
    workers = _start_workers(tmp_path, ckpt)  # the reference runs meanwhile: most of the time is imports and loads
    shims.apply()
    try:
        try:
            single = _load_peft(ckpt)
            single_losses = torch.stack(_train(single, _batch()))
            single_lora = _lora(single.state_dict())
            shims.save_merged(single, tmp_path / "merged_single", dtype=torch.float32, tokenizer=False)
        finally:
            _wait_workers(workers)
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
        got = ranks[0]

        # the loss sequence
        assert (got["losses"] - single_losses).abs().max().item() <= LOSS_BOUND, (got["losses"], single_losses)

        # every LoRA moved (attention and experts), and ends where the single-process run ends
        assert set(got["lora"]) == set(single_lora)
        assert sum(".experts." in k for k in single_lora) == 8  # 2 layers x (gate_up, down) x (A, B)
        unmoved = [k for k, v in got["lora"].items() if torch.equal(v, got["initial_lora"][k])]
        assert not unmoved, unmoved
        lora_diff = max((got["lora"][k] - v).abs().max().item() for k, v in single_lora.items())
        assert lora_diff <= LORA_BOUND, lora_diff

        # the packed 4-bit storage survives sharding, 3 steps and the full-state-dict gather bit for bit
        assert set(got["packed"]) == set(got["initial_packed"]) and len(got["packed"]) == 6  # experts + routers
        for key, value in got["packed"].items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value.view(torch.int16), got["initial_packed"][key].view(torch.int16)), key

        # per rank: 1/WORLD of the packed expert bytes; the QuantState is replicated, not sharded
        for r, result in enumerate(ranks):
            whole, local = result["unsharded_bytes"], result["sharded_bytes"]
            assert whole == fsdp.local_expert_bytes(single), r
            assert local["packed"] * WORLD == whole["packed"], (r, local, whole)
            assert local["quant_state"] == whole["quant_state"], (r, local, whole)

        # shims.save_merged straight from the sharded model refuses (documented limitation), on every rank
        for result in ranks:
            assert result["direct_merge_error"] is not None
            assert "does not fit base" in result["direct_merge_error"], result["direct_merge_error"]

        # the adapter saved from the sharded run == the gathered LoRA, and the single-process adapter within bound
        base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16,
            bnb_4bit_compute_dtype=torch.float32))
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        reloaded_lora = _lora(reloaded.state_dict())
        assert set(reloaded_lora) == set(got["lora"])
        for key, value in reloaded_lora.items():
            assert torch.equal(value, got["lora"][key]), key

        # save_merged (float32, so no bf16 rounding hides or inflates differences) from that adapter + a fresh base:
        # bit-exact against the same merge from a live model holding the sharded run's LoRA, and within the LoRA
        # bound of the single-process export
        shims.save_merged(reloaded, tmp_path / "merged_sharded", dtype=torch.float32, tokenizer=False)
        merged = _merged_tensors(tmp_path / "merged_sharded")
        reference = _merged_tensors(tmp_path / "merged_single")
        assert not single.load_state_dict(got["lora"], strict=False).unexpected_keys
        shims.save_merged(single, tmp_path / "merged_live", dtype=torch.float32, tokenizer=False)
        live = _merged_tensors(tmp_path / "merged_live")
        assert set(merged) == set(reference) == set(live)
        for key, value in live.items():
            assert torch.equal(merged[key], value), key
        merged_diff = max((merged[k] - v).abs().max().item() for k, v in reference.items())
        assert merged_diff <= MERGED_BOUND, merged_diff
    finally:
        shims.restore()


if __name__ == "__main__":
    _rank, _world, _port, _out, _ckpt = sys.argv[1:6]
    _worker(int(_rank), int(_world), int(_port), Path(_out), _ckpt)
