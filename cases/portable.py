"""Adapters travelling between cells: published by native runs, loaded by other cells.

A cell publishes, per arch and quantization, its saved adapter, the base checkpoint it trained on and the
trained model's logits on the fixed evaluation batch. Another cell (other peft or transformers) loads that
adapter into that base and compares logits: the exact reference for "this adapter still means the same".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import measure



class NothingToDo(Exception):
    """The stage has nothing to check in this case (recorded as skipped, with the reason)."""


def _versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}


def _entry_name(versions: dict) -> str:
    return f"tf{versions['transformers']}-peft{versions['peft']}"


def _publish_entry(folder: Path, name: str, source: Path, logits, batch, meta: dict) -> Path:
    """Write ``folder/<this cell's versions>/`` atomically: ``source`` copied as ``name``, the reference logits with
    their batch, and meta.json; readers see the old entry or the whole new one."""
    versions = _versions()
    target = folder / _entry_name(versions)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.copytree(source, tmp / name)
    torch.save({"logits": logits.cpu(), "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
               tmp / "reference.pt")
    (tmp / "meta.json").write_text(json.dumps({**versions, **meta}))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def publish(store: Path, arch: str, quant: str, adapter_dir: Path, base_dir: Path, reference, batch) -> Path:
    return _publish_entry(store / f"{arch}-{quant}", "adapter", adapter_dir, reference, batch,
                          {"base_dir": str(base_dir), "arch": arch, "quant": quant})


PREQUANTIZED = "prequantized"  # store subfolder: 4-bit checkpoints that transformers 4.x wrote


def publish_prequantized(store: Path, arch: str, quant: str, checkpoint: Path, logits, batch) -> Path:
    """A transformers 4.x pre-quantized checkpoint and its logits, for 5.x cells to load (atomic, like adapters)."""
    return _publish_entry(store / PREQUANTIZED / f"{arch}-{quant}", "checkpoint", checkpoint, logits, batch,
                          {"arch": arch, "quant": quant})


def prequantized_entries(store: Path, arch: str, quant: str) -> list[Path]:
    """Pre-quantized checkpoints of this arch that transformers 4.x published, for a 5.x cell (none on 4.x)."""
    if _major(_versions()["transformers"]) < 5:
        return []
    folder = store / PREQUANTIZED / f"{arch}-{quant}"
    if not folder.is_dir():
        return []
    return [e for e in sorted(folder.iterdir()) if not e.name.startswith(".") and (e / "meta.json").exists()]


def foreign_entries(store: Path, arch: str, quant: str) -> list[Path]:
    """Published entries of other (transformers, peft) pairs that this transformers can load.

    transformers 5.x reads 4.57 checkpoints (it fuses per-expert tensors at load); the reverse is not a
    supported path, so a 4.57 cell only looks at 4.57 entries.
    """
    mine = _major(_versions()["transformers"])
    return [entry for entry, meta in _other_cells_entries(store, arch, quant) if _major(meta["transformers"]) <= mine]


def _other_cells_entries(store: Path, arch: str, quant: str) -> list[tuple[Path, dict]]:
    """(entry, its meta) of every complete publication for this case by another (transformers, peft) pair."""
    mine = _versions()
    folder = store / f"{arch}-{quant}"
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir()):
        meta_path = entry / "meta.json"
        if entry.name.startswith(".") or not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        if (meta["transformers"], meta["peft"]) != (mine["transformers"], mine["peft"]):
            out.append((entry, meta))
    return out


def _major(version: str) -> int:
    return int(version.split(".")[0])


def _target_layout(adapter_dir: Path, base) -> str | None:
    """The layout shims.convert_adapter must produce from a fused adapter for the installed peft and this base, or
    None if nothing (4.x per-expert adapters: the shims' adapter_layout_on_load converts them inside from_pretrained)."""
    from shims.adapters import adapter_convert, lora_layout

    # decided on this base's experts modules: peft's convention follows their is_transposed attribute, which
    # gpt_oss has on 5.x and lacks on 4.57
    wanted = lora_layout.expected_layout(base)
    found = {e.layout for e in adapter_convert.detect_adapter_layout(adapter_dir, base.config).values()}
    return None if found == {wanted} else wanted


def _convert_for_here(adapter: Path, base, dest: Path) -> tuple[Path, str | None]:
    import shims

    target = _target_layout(adapter, base)
    if target is None:
        return adapter, None
    shutil.rmtree(dest, ignore_errors=True)
    shims.convert_adapter(adapter, dest, to=target, base_config=base.config)
    return dest, target


def try_foreign(entry: Path, load_base, shims_on: bool, work: Path) -> dict:
    from peft import PeftModel

    meta = json.loads((entry / "meta.json").read_text())
    ref = torch.load(entry / "reference.pt")
    outcome = {"from": entry.name, "ok": False, "kl": None, "converted": None}
    try:
        base = load_base(Path(meta["base_dir"]))
        adapter = entry / "adapter"
        from shims.adapters.adapter_load import conversion_for, is_per_expert_adapter  # structure only: they patch nothing

        if shims_on and is_per_expert_adapter(adapter):
            # a 4.x adapter loads as a user loads it: the shims' adapter_layout_on_load converts it inside
            outcome["converted"] = conversion_for(adapter, base)
        elif shims_on:
            adapter, outcome["converted"] = _convert_for_here(adapter, base, work / entry.name)
        model = PeftModel.from_pretrained(base, adapter)
        batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
        outcome["kl"] = measure.kl(ref["logits"], measure.logits(model, batch), batch["attention_mask"])
        outcome["ok"] = True  # loaded and compared; harness/verdict.py judges the KL (rule kl_foreign)
    except Exception as exc:  # recorded per adapter; the stage fails if any adapter failed
        outcome["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return outcome


def fused_entries(store: Path, arch: str, quant: str) -> list[Path]:
    """Published adapters of other (transformers, peft) pairs whose expert LoRA is fused (``target_parameters``, as
    transformers 5.x trains it): what a cell with per-expert experts must convert to read (stage per_expert_adapters).
    Decided on each adapter's own files, not on the publisher's version."""
    return [entry for entry, _ in _other_cells_entries(store, arch, quant) if _has_fused_expert_lora(entry / "adapter")]


def _has_fused_expert_lora(adapter_dir: Path) -> bool:
    from shims.adapters.adapter_load import is_per_expert_adapter  # structure only: it patches nothing

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return any(".experts." in f".{t}" for t in config.get("target_parameters") or ()) \
        and not is_per_expert_adapter(adapter_dir)


def has_fused_experts(model) -> bool:
    """Whether ``model`` keeps its routed experts as fused 3D tensors (transformers 5.x; gpt_oss on 4.57 too): such
    a model reads fused expert LoRA as published and has no per-expert modules to convert to."""
    from shims.quant.storage import iter_expert_modules  # structure only: it patches nothing

    return any(True for _ in iter_expert_modules(model))


# routed-expert count keys of the archs' configs (qwen3_moe: num_experts; mixtral, gpt_oss: num_local_experts;
# deepseek_v3, glm4_moe: n_routed_experts)
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def config_as_published(base_dir: Path):
    """The publisher's base config as this transformers reads it, with the routed-expert count that the checkpoint
    holds, and what had to be set for that. transformers 5.x writes qwen3_moe's count only as num_local_experts;
    4.57 reads num_experts (default 128) and would add 124 randomly initialised experts to a 4-expert checkpoint,
    with a warning only. Both shims modes load the base this way: the stage compares adapters, not configs."""
    from transformers import AutoConfig

    written = json.loads((Path(base_dir) / "config.json").read_text())
    counts = {written[k] for k in _EXPERT_COUNT_KEYS if isinstance(written.get(k), int)}
    config = AutoConfig.from_pretrained(base_dir)
    if len(counts) != 1:
        raise ValueError(f"{base_dir}/config.json: expected one routed-expert count among {_EXPERT_COUNT_KEYS}, "
                         f"found {sorted(counts)}")
    (count,) = counts
    fixed = []
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value != count:
            fixed.append(f"{key}: {value} -> {count}")
            setattr(config, key, count)
    return config, fixed


def _per_expert_linears(model) -> int:
    """Per-expert nn.Linear modules (``...experts.<e>.<proj>``) of a base model: each must carry LoRA after a
    per-expert adapter loads."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and _per_expert_name(name))


def _per_expert_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit()


def _per_expert_loras(model) -> int:
    """Per-expert modules of a PeftModel that carry a LoRA (a LoRA layer's base_layer is the expert Linear)."""
    return sum(1 for name, m in model.named_modules() if _per_expert_name(name) and hasattr(m, "lora_A"))


def try_per_expert(entry: Path, load_base, shims_on: bool, work: Path) -> dict:
    """Load a published fused adapter into its publisher's base on a per-expert transformers: natively as it is,
    with shims after shims.convert_adapter(to="per_expert"); compare with the publisher's logits."""
    from peft import PeftModel

    meta = json.loads((entry / "meta.json").read_text())
    ref = torch.load(entry / "reference.pt")
    outcome = {"from": entry.name, "ok": False, "max_abs": None, "kl": None, "converted": False}
    try:
        config, outcome["config_fixed"] = config_as_published(Path(meta["base_dir"]))
        base = load_base(Path(meta["base_dir"]), config=config)
        outcome["expert_linears"] = _per_expert_linears(base)
        adapter = entry / "adapter"
        if shims_on:
            import shims

            adapter = work / entry.name
            shutil.rmtree(adapter, ignore_errors=True)
            shims.convert_adapter(entry / "adapter", adapter, to="per_expert", base_config=base.config)
            outcome["converted"] = True
        model = PeftModel.from_pretrained(base, adapter)
        outcome["expert_loras"] = _per_expert_loras(model)
        batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
        out = measure.logits(model, batch)
        outcome["max_abs"] = float((out - ref["logits"]).abs().max())
        outcome["kl"] = measure.kl(ref["logits"], out, batch["attention_mask"])
        outcome["ok"] = True  # loaded and compared; harness/verdict.py judges it (rule per_expert_adapter)
    except Exception as exc:  # recorded per adapter (not a fallback): the stage fails if any adapter failed
        outcome["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return outcome


