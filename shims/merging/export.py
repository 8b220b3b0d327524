"""Merged 16-bit export of a PeftModel: every LoRA delta applied, the live model untouched.

Each output tensor is built on its own (dequantize base if 4-bit -> add peft's own ``get_delta_weight`` in
float32 -> cast), grouped into safetensors shards of at most ``max_shard_size`` bytes, converted back to the
base's on-disk key format with transformers' own ``revert_weight_conversion`` (per-expert keys for qwen3_moe,
mixtral, deepseek_v3, glm4_moe ...; gpt_oss stays fused) and written into a temp folder next to the
destination, which is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..files import refuse_existing, staged_dir, write_json
from ..quant.storage import dequantize_param, quantized_parametrization

log = logging.getLogger("shims")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# a tokenizer folder holds its vocabulary in one of these (fast serialization, sentencepiece model, BPE vocab)
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_BNB_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..*)$")
_PARAMETRIZED = re.compile(r"^(?P<owner>.*?)\.?parametrizations\.(?P<name>[^.]+)\.original$")


class MergeError(RuntimeError):
    """A LoRA delta could not be applied; nothing was written."""


class MissingTokenizerError(ValueError):
    """save_merged found no tokenizer for the base model and was not told to do without one; nothing was written."""


@dataclass
class _Delta:
    wrapper: object
    adapter: str
    kind: str  # "experts" or "attention" (every non-expert module LoRA)


@dataclass
class _Plan:
    sources: dict = field(default_factory=dict)   # clean key -> (owner module, attr name, raw tensor)
    deltas: dict = field(default_factory=dict)    # clean key -> [_Delta]


def save_merged(model, save_directory, dtype=None, overwrite: bool = False, max_shard_size: int | str = "2GB",
                tokenizer=None) -> dict:
    """Write a standard Hugging Face checkpoint of ``model`` (a PeftModel) with every active LoRA merged.

    ``dtype`` defaults to bfloat16. The base may be bf16/fp32, carry 4-bit experts quantized by
    ``shims.quant.storage``, or bitsandbytes ``Linear4bit`` layers; they are dequantized for the merge. Writes
    model safetensors (sharded with an index when larger than ``max_shard_size``), config.json without
    ``quantization_config``, generation_config.json, and the tokenizer, so that a serving engine can load the
    folder as it is:

    * ``tokenizer=None`` (default): the base's tokenizer files, copied from where transformers finds the base's
      ``config._name_or_path``: its local folder, or that model id's snapshot in the local Hugging Face cache
      (never downloaded). When neither holds a tokenizer, MissingTokenizerError is raised before anything is
      written.
    * a tokenizer object (anything with ``save_pretrained``): saved into the folder.
    * ``tokenizer=False``: no tokenizer files; the folder cannot serve text prompts.

    Returns ``{"applied": n, "attempted": n, "experts": n, "attention": n, "shards": n, "path": str}``.
    Raises MergeError (and writes nothing) when any delta cannot be applied; MissingTokenizerError (a
    ValueError) as above; FileExistsError when ``save_directory`` exists and ``overwrite`` is False. With
    ``overwrite=True`` the old folder is replaced only after the new one is complete.
    """
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    limit = _parse_size(max_shard_size)
    dst = Path(save_directory)
    refuse_existing(dst, overwrite)
    base = _unwrap_peft(model)
    tokenizer_source = _tokenizer_source(base, tokenizer)
    adapters = _active_adapters(model)
    plan = _plan(base, adapters)
    _check_plan(plan)

    with staged_dir(dst, overwrite) as tmp:
        counts = _write_shards(base, plan, tmp, dtype, limit)
        _write_side_files(base, tmp, dtype, tokenizer_source)
    counts["path"] = str(dst)
    log.info("shims: merged export to %s: %s", dst, counts)
    return counts


# ---------------------------------------------------------------------------------------------------- plan
def _unwrap_peft(model):
    get_base = getattr(model, "get_base_model", None)
    if get_base is None:
        raise TypeError(f"expected a peft PeftModel, got {type(model).__name__}")
    return get_base()


def _active_adapters(model) -> list[str]:
    active = model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter]
    return [active] if isinstance(active, str) else list(active)


def _clean(path: str) -> str:
    return re.sub(r"\.base_layer(?=\.|$)", "", path)


def _plan(base, adapters) -> _Plan:
    from peft.tuners.tuners_utils import BaseTunerLayer

    plan = _Plan()
    for key, tensor in base.state_dict(keep_vars=True).items():
        if ".lora_" in key or _BNB_STATE.search(key):
            continue
        m = _PARAMETRIZED.match(key)
        if m:
            owner_path, name = m["owner"], m["name"]
        else:
            owner_path, _, name = key.rpartition(".")
        clean = f"{_clean(owner_path)}.{name}" if owner_path else name
        if clean in plan.sources:
            raise MergeError(f"two tensors map to {clean}")
        plan.sources[clean] = (base.get_submodule(owner_path) if owner_path else base, name, tensor)

    for path, module in base.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        if getattr(module, "merged", False):
            raise MergeError(f"{path} has merged adapters {module.merged_adapters}; unmerge them first")
        names = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
        for adapter in adapters:
            if adapter not in names:
                continue
            if type(module).__name__ == "ParamWrapper":
                clean = f"{_clean(path)}.{module.parameter_name}"
            else:
                clean = f"{_clean(path)}.weight"
            # routed experts (fused 3D on 5.x, experts.N.* Linear on 4.57) vs everything else (attention,
            # dense/shared MLPs), reported as "attention"
            kind = "experts" if re.search(r"\.experts(\.|$)", _clean(path)) else "attention"
            plan.deltas.setdefault(clean, []).append(_Delta(module, adapter, kind))
    return plan


def _check_plan(plan: _Plan) -> None:
    missing = sorted(set(plan.deltas) - set(plan.sources))
    if missing:
        raise MergeError(f"LoRA targets without a base tensor in the state dict: {missing[:5]}")
    for key, deltas in plan.deltas.items():
        for d in deltas:
            if not hasattr(d.wrapper, "get_delta_weight"):
                raise MergeError(f"{key}: {type(d.wrapper).__name__} has no get_delta_weight")


# ---------------------------------------------------------------------------------------------------- tensors
def _base_value(owner, name, raw):
    """The logical float value of a base tensor (dequantized when stored in 4 bits)."""
    import torch

    # Any tensor the shims store 4-bit (experts, routers), whatever its quant_storage dtype.
    if quantized_parametrization(owner, name) is not None:
        return dequantize_param(owner, name)
    quant_state = getattr(raw, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit (transformers 4.57 per-expert Linear4bit, attention)
        import bitsandbytes.functional as F

        return F.dequantize_4bit(raw.data, quant_state)
    if raw.dtype == torch.uint8 and torch.nn.utils.parametrize.is_parametrized(owner, name):
        return getattr(owner, name)
    return raw.detach()


def kept_float32(base, dtype):
    """A regex over state-dict keys of the tensors the model keeps in float32 in a ``dtype`` model, or None.

    transformers keeps ``_keep_in_fp32_modules_strict`` (e.g. glm4_moe's ``gate.weight`` router) in float32 in
    any 16-bit model and ``_keep_in_fp32_modules`` in float16 ones; an export in that dtype keeps them so too, as
    the model's own save_pretrained would, instead of rounding a float32 router to bf16."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16):
        return None
    names = list(getattr(base, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        names += list(getattr(base, "_keep_in_fp32_modules", None) or [])
    if not names:
        return None
    return re.compile("|".join(rf"(?:^|\.){re.escape(n)}(?:$|\.)" for n in names))


# Elements of one merge step: an expert stack is merged this many elements (whole experts) at a time, so the float32
# temporaries on the model's device stay ~1 GiB whatever the stack (Qwen3-30B-A3B gate_up: 402 M elements).
MERGE_CHUNK_ELEMENTS = 1 << 26


def _merged_value(key, plan: _Plan, dtype, counts):
    """The merged tensor ``key`` in ``dtype``, in host memory (the shard being written lives there anyway): only
    one merge chunk's float32 temporaries are ever on the model's device beyond the dequantized base."""
    import torch

    owner, name, raw = plan.sources[key]
    deltas = plan.deltas.get(key, ())
    with torch.no_grad():
        base = _base_value(owner, name, raw)
        out_dtype = dtype if base.is_floating_point() else raw.dtype
        if not deltas:
            return base.to(device="cpu", dtype=out_dtype).contiguous()
        out = torch.empty(base.shape, dtype=out_dtype, device="cpu")
        for start, stop in _merge_chunks(base, deltas):
            # a copy: a float32 base is the live parameter itself, which the in-place sums below must not touch
            value = base[start:stop].to(torch.float32, copy=True)
            for d in deltas:
                delta = _float32_delta(d.wrapper, d.adapter, (start, stop) if _is_expert_stack(d, base) else None)
                if value.dim() == 3 and value.shape[0] == 1 and tuple(delta.shape) == tuple(value.shape[1:]):
                    # a one-expert stack (inkling's shared experts (1, out, in)): peft computes its delta as a plain
                    # Linear's and its forward and merge broadcast it over the single expert; so does the export
                    delta = delta.unsqueeze(0)
                if tuple(delta.shape) != tuple(value.shape):
                    raise MergeError(f"{key}: delta {tuple(delta.shape)} does not fit base {tuple(value.shape)}")
                value += delta.to(torch.float32)
                del delta
            out[start:stop] = value.to(out_dtype)
            del value
        for d in deltas:
            counts["attempted"] += 1
            counts["applied"] += 1
            counts[d.kind] += 1
        return out


def _is_expert_stack(d: _Delta, base) -> bool:
    return type(d.wrapper).__name__ == "ParamWrapper" and base.dim() == 3 and getattr(d.wrapper, "num_experts", 1) > 1


def _merge_chunks(base, deltas):
    """(start, stop) along dim 0: whole experts, ~MERGE_CHUNK_ELEMENTS each, for an expert stack whose every delta
    is an expert LoRA; the whole tensor otherwise. No chunk holds a single expert: peft computes a one-expert
    ParamWrapper's delta as a plain Linear's."""
    if not all(_is_expert_stack(d, base) for d in deltas):
        return [(0, base.shape[0])]
    experts = base.shape[0]
    step = max(2, MERGE_CHUNK_ELEMENTS // max(1, base[0].numel()))
    chunks = [[i, min(i + step, experts)] for i in range(0, experts, step)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] == 1:
        last = chunks.pop()
        chunks[-1][1] = last[1]
    return [tuple(c) for c in chunks]


class _FactorHolder:
    """Stands in for a LoRA ``nn.Linear`` where peft only reads ``.weight``."""

    def __init__(self, weight):
        self.weight = weight


def _float32_delta(wrapper, adapter, experts: tuple[int, int] | None = None):
    """peft's own ``get_delta_weight``, without its final cast to the base parameter's dtype; for an expert stack
    optionally only experts ``[start, stop)``.

    ParamWrapper casts the delta to the (bf16 / dequantized) parameter's dtype, which would round the delta
    before the float32 addition. It reads only that parameter's dtype and device, so it runs on a shallow
    view whose base layer is a stub holding an empty float32 tensor: same factors, same convention, and the
    live wrapper is not touched. For an expert range the view holds those experts' factors (peft's convention:
    lora_A rows expert-major, lora_B columns expert-fastest, see shims.adapters.lora_layout) and that many experts.
    lora.Linear and friends already return the delta in the adapter's dtype.
    """
    import torch

    if type(wrapper).__name__ != "ParamWrapper":
        return wrapper.get_delta_weight(adapter)
    device = wrapper.lora_A[adapter].weight.device
    stub = torch.nn.Module()
    setattr(stub, wrapper.parameter_name, torch.empty(0, dtype=torch.float32, device=device))
    view = copy.copy(wrapper)
    view._modules = dict(wrapper._modules)  # own dict: the live wrapper keeps its real base layer
    view._modules["base_layer"] = stub
    if experts is not None and experts != (0, wrapper.num_experts):
        from ..adapters.lora_layout import expert_factors, stack_expert_factors

        a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
        part_a, part_b = stack_expert_factors(
            [expert_factors(a, b, wrapper.num_experts, e) for e in range(*experts)])
        view._modules["lora_A"] = {adapter: _FactorHolder(part_a)}
        view._modules["lora_B"] = {adapter: _FactorHolder(part_b)}
        view.num_experts = experts[1] - experts[0]
    return view.get_delta_weight(adapter)


def _to_disk_format(base, shard: dict) -> dict:
    """transformers' own reverse of its load-time conversion (fused experts -> per-expert keys)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: the state dict is already the on-disk format
        return shard
    return revert_weight_conversion(base, shard)


def _write_shards(base, plan: _Plan, tmp: Path, dtype, limit: int) -> dict:
    from safetensors.torch import save_file

    counts = {"applied": 0, "attempted": 0, "experts": 0, "attention": 0}
    names, weight_map, shard, size = [], {}, {}, 0

    def flush():
        nonlocal shard, size
        if not shard:
            return
        disk = _to_disk_format(base, shard)
        fname = f"part-{len(names):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in disk.items()}, str(tmp / fname), metadata={"format": "pt"})
        names.append((fname, list(disk)))
        shard, size = {}, 0

    import torch

    keep = kept_float32(base, dtype)
    for key in plan.sources:
        value = _merged_value(key, plan, torch.float32 if keep and keep.search(key) else dtype, counts)
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[key] = value
        size += nbytes
    flush()

    total = len(names)
    if total == 1:
        (tmp / names[0][0]).rename(tmp / "model.safetensors")
    else:
        for i, (fname, keys) in enumerate(names, 1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (tmp / fname).rename(tmp / final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": sum((tmp / f).stat().st_size for f in set(weight_map.values()))},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(tmp / "model.safetensors.index.json", index)
    counts["shards"] = total
    return counts


def _write_side_files(base, tmp: Path, dtype, tokenizer_source) -> None:
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):  # the export is not quantized
        if hasattr(config, attr):
            delattr(config, attr)
    # transformers 5 names it dtype (torch_dtype is a deprecated alias); 4.57 only has torch_dtype
    setattr(config, "dtype" if "dtype" in config.to_dict() else "torch_dtype", dtype)
    config.save_pretrained(tmp)
    gen = getattr(base, "generation_config", None)
    if gen is not None and getattr(base, "can_generate", lambda: False)():
        gen.save_pretrained(tmp)
    if tokenizer_source is None:
        return
    if isinstance(tokenizer_source, dict):
        for name, path in tokenizer_source.items():
            shutil.copy2(path, tmp / name)  # a hub cache snapshot holds symlinks: the file's content is copied
        return
    tokenizer_source.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------------- tokenizer
_ADVICE = ("A checkpoint without a tokenizer cannot serve text (vLLM starts, then rejects every prompt). Pass "
           "tokenizer=<the tokenizer you trained with> (anything with save_pretrained), or tokenizer=False to write "
           "the folder without tokenizer files. Nothing was written.")


def _tokenizer_source(base, tokenizer):
    """What save_merged writes as the tokenizer, resolved before anything is written: None (``tokenizer=False``),
    the given tokenizer object, or {file name: path} of the base's own tokenizer files."""
    if tokenizer is False:
        log.info("shims: save_merged writes no tokenizer files (tokenizer=False); the folder cannot serve text")
        return None
    if tokenizer is not None:
        if tokenizer is True or not callable(getattr(tokenizer, "save_pretrained", None)):
            raise TypeError("save_merged: tokenizer must be a tokenizer (with save_pretrained), None or False; got "
                            f"{type(tokenizer).__name__}")
        return tokenizer
    name = str(getattr(base.config, "_name_or_path", "") or "")
    if not name:
        raise MissingTokenizerError("save_merged: no tokenizer for the base model: its config has no _name_or_path "
                                    f"(built from a config, not loaded from a folder or model id). {_ADVICE}")
    found, where = _base_tokenizer_files(name)
    if not any(n in found for n in _VOCAB_FILES):
        only = f" (only {', '.join(sorted(found))})" if found else ""
        raise MissingTokenizerError(f"save_merged: no tokenizer for the base model: {where} has none of "
                                    f"{', '.join(_VOCAB_FILES)}{only}. {_ADVICE}")
    log.info("shims: save_merged copies the tokenizer from %s: %s", where, ", ".join(sorted(found)))
    return found


def _base_tokenizer_files(name: str) -> tuple[dict, str]:
    """{file name: path} of the tokenizer files transformers finds for ``name`` (a base's ``_name_or_path``) without
    a download: in that local folder, else in that model id's snapshot (revision main) in the local Hugging Face
    cache; and a phrase naming where it looked."""
    if Path(name).is_dir():
        folder = Path(name)
        return {n: folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()}, f"the base's folder {name}"
    from huggingface_hub import constants, try_to_load_from_cache

    where = f"{name!r} (not a local folder) in the local Hugging Face cache {constants.HF_HUB_CACHE}"
    found = {}
    for n in _TOKENIZER_FILES:
        try:
            path = try_to_load_from_cache(name, n)
        except ValueError as exc:  # HFValidationError: the name is neither a folder nor a repo id
            raise MissingTokenizerError(f"save_merged: no tokenizer for the base model: its _name_or_path {name!r} "
                                        f"is not a local folder, nor a model id ({exc}). {_ADVICE}") from exc
        if isinstance(path, str):  # None: not cached; a sentinel object: cached as absent from the repo
            found[n] = Path(path)
    return found, where


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '2GB', '500MB'")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m[2]])
