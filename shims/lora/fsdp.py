"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers for models with shim 4-bit experts.

What FSDP2 does with the shims' storage, measured on CPU / gloo (torch 2.13, tests/shims/lora/test_fsdp.py): the packed
4-bit ``original`` of each parametrization is an ordinary frozen ``nn.Parameter``, so ``fully_shard`` shards it along
dim 0 like any other parameter and all-gathers it before the layer's forward; the parametrization then dequantizes
the whole tensor with the (unsharded) ``QuantState`` it keeps. Nothing needs patching for training. Two things do
need care, and these helpers do them:

- per-rank memory: ``shims.quant.storage.expert_storage`` counts ``numel()``, which for a DTensor is the GLOBAL size;
  :func:`local_expert_bytes` counts what this rank really holds. The ``QuantState`` (absmax, code, nested
  statistics) is a plain attribute of the parametrization module, not a parameter, so FSDP does not shard it: every
  rank keeps all of it (nf4 without double quant: a float32 absmax per 64 elements, 1/8 of the packed bytes).
- saving: the LoRA parameters are DTensors, which ``PeftModel.save_pretrained`` cannot write, and
  ``shims.save_merged`` refuses (``MergeError``: the local shard does not have the logical shape).
  :func:`save_adapter` gathers the full state dict on every rank (a collective) and writes the adapter on rank 0;
  merge from that adapter and a fresh base with ``shims.save_merged``. (``FSDPModule.unshard()`` on every module
  and then ``save_merged`` on rank 0 only is no way round: peft's LoRA weights were still DTensors there, and the
  first delta matmul waited for a collective the other ranks never joined: a hang.)
"""

from __future__ import annotations

from ..quant.storage import iter_expert_modules, quant_state_bytes, quantized_parametrization, raw_tensor


def _local(tensor):
    """This rank's shard of a DTensor (a plain tensor is returned as is)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def local_expert_bytes(model) -> dict:
    """Bytes of 4-bit expert storage resident on THIS rank: ``packed`` (the local shard of every packed ``original``)
    and ``quant_state`` (absmax and friends, replicated on every rank). Float (unquantized) experts are not counted."""
    packed = quant = 0
    for _, module in iter_expert_modules(model):
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            param = quantized_parametrization(module, name)
            if param is None:
                continue
            local = _local(raw_tensor(module, name))
            packed += local.numel() * local.element_size()
            quant += quant_state_bytes(param.quant_state)
    return {"packed": packed, "quant_state": quant}


def full_state_dict(model) -> dict:
    """The model's full (unsharded) state dict on CPU, on every rank. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_adapter(model, save_directory, state_dict=None) -> None:
    """``PeftModel.save_pretrained`` of an FSDP2-sharded PeftModel: gathers the full state dict (a collective, so
    every rank must call this) and writes the adapter from rank 0 only. ``state_dict``: an already gathered
    :func:`full_state_dict`, to gather once for several uses."""
    import torch.distributed as dist

    if state_dict is None:
        state_dict = full_state_dict(model)
    if dist.get_rank() == 0:
        # peft keeps only the adapter's keys of the state dict it is given (no DTensor reaches safetensors).
        model.save_pretrained(save_directory, state_dict=state_dict)
    dist.barrier()  # nobody reads the adapter before it is complete
