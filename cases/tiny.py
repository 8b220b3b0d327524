"""Tiny MoE models, a character tokenizer and a learnable dataset, all built offline with fixed seeds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


class ArchUnavailable(RuntimeError):
    """The installed transformers does not know this model type."""


def arch_known(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def build_config(model_type: str, common: dict, extra: dict):
    if not arch_known(model_type):
        raise ArchUnavailable(f"transformers {transformers.__version__} has no model type {model_type!r}")
    return AutoConfig.for_model(model_type, **{**common, **extra})


def build_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    # A chat template is not needed: trl gets plain "text" examples.
    return fast


def training_texts() -> list[str]:
    """Short, highly regular sentences: a tiny model's loss falls on them within a few dozen steps."""
    words = ["the cat sat", "a dog ran", "the sun is up", "we go home", "it is red", "you can see"]
    return [f"{w}. {w}. {w}." for w in words] * 4


def prompts(n: int) -> list[str]:
    return ["the cat", "a dog", "we go", "it is"][:n]


def _spec_digest(model_type: str, common: dict, extra: dict) -> str:
    blob = json.dumps([model_type, common, extra, transformers.__version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_and_save(model_type: str, common: dict, extra: dict, cache_root: Path) -> tuple[Path, bool]:
    """Build the tiny model in this transformers' on-disk format; reuse a cached copy. Returns (dir, cached)."""
    target = cache_root / f"tf{transformers.__version__}" / f"{model_type}-{_spec_digest(model_type, common, extra)}"
    if (target / "config.json").exists():
        return target, True
    config = build_config(model_type, common, extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").exists():  # a parallel cell finished the same model first
            return target, True
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, False
