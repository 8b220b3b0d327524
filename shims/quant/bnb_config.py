"""The BitsAndBytesConfig rules the shims follow: how a tensor is stored (:class:`QuantSettings`), whether a load is a
bitsandbytes 4-bit one, and which modules ``llm_int8_skip_modules`` / ``modules_to_not_convert`` keep in 16/32-bit.

The skip rules are those of the loader that is installed (:mod:`shims.loader_generation`), so that a skipped module
is skipped alike for the layers bitsandbytes converts and for the tensors the shims store in 4 bits:

- the 5.x loader matches every entry as a regex too (``re.match`` with a module boundary), so an entry that is not
  a valid regex fails the load there; the shims say so, naming the entry, instead of silently ignoring it;
- the 4.x loader matches plain substrings at module boundaries; an entry such as ``"lm_head("`` is a legal literal
  there and is matched literally.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ..loader_generation import V4, transformers_loader

_SETTINGS_ATTR = "_shims_settings"


@dataclass(frozen=True)
class QuantSettings:
    """The subset of BitsAndBytesConfig that decides how an expert tensor is stored."""

    quant_type: str = "nf4"
    compress_statistics: bool = False
    compute_dtype: "object" = None  # torch.dtype; None -> the tensor's own dtype
    quant_storage: "object" = None  # torch.dtype; None -> uint8
    blocksize: int | None = None  # None -> bitsandbytes' default

    @classmethod
    def from_bnb_config(cls, cfg) -> "QuantSettings":
        import torch

        def as_dtype(value, default):
            if value is None:
                return default
            if isinstance(value, str):
                return getattr(torch, value)
            return value

        return cls(
            quant_type=getattr(cfg, "bnb_4bit_quant_type", "nf4"),
            compress_statistics=bool(getattr(cfg, "bnb_4bit_use_double_quant", False)),
            compute_dtype=as_dtype(getattr(cfg, "bnb_4bit_compute_dtype", None), torch.float32),
            quant_storage=as_dtype(getattr(cfg, "bnb_4bit_quant_storage", None), torch.uint8),
        )


def settings_of(hf_quantizer) -> QuantSettings:
    """The QuantSettings of a quantizer's config, built once per quantizer (the loader asks for every tensor)."""
    settings = getattr(hf_quantizer, _SETTINGS_ATTR, None)
    if settings is None:
        settings = QuantSettings.from_bnb_config(hf_quantizer.quantization_config)
        setattr(hf_quantizer, _SETTINGS_ATTR, settings)
    return settings


def is_bnb_4bit(hf_quantizer) -> bool:
    """True for a bitsandbytes ``load_in_4bit`` quantizer (the only kind the shims store tensors for)."""
    cfg = getattr(hf_quantizer, "quantization_config", None)
    method = getattr(cfg, "quant_method", "")
    return bool(getattr(cfg, "load_in_4bit", False)) and getattr(method, "value", method) == "bitsandbytes"


def skip_patterns(hf_quantizer) -> list[str]:
    """The entries that keep modules unquantized: the quantizer's resolved list, else the config's own."""
    patterns = getattr(hf_quantizer, "modules_to_not_convert", None)
    if patterns is None:
        patterns = getattr(hf_quantizer.quantization_config, "llm_int8_skip_modules", None)
    return list(patterns or [])


def is_skipped(module_name: str, patterns) -> bool:
    """Whether ``module_name`` is kept unquantized by ``patterns``, by the installed loader's rules."""
    if transformers_loader() == V4:
        return matches_v4_skip_rules(module_name, patterns)
    return matches_v5_skip_rules(module_name, patterns)


def matches_v5_skip_rules(module_name: str, patterns) -> bool:
    """transformers 5.x's rules: the entry names the module, a prefix up to a module boundary, a suffix from one,
    or is a regex that matches the module or one of its ancestors. ValueError for an entry that is no regex."""
    for key in patterns or ():
        if module_name == key or module_name.startswith(key + ".") or module_name.endswith("." + key):
            return True
        if _module_regex(key).fullmatch(module_name):
            return True
    return False


def matches_v4_skip_rules(module_name: str, patterns) -> bool:
    """transformers 4.x's rules, literal (no regex): the entry is the module's own name, or occurs in its path
    ending at a module boundary (which covers the whole path, a prefix and a suffix)."""
    own_name = module_name.rpartition(".")[2]
    return any(key == own_name or f"{key}." in f"{module_name}." for key in patterns or ())


@functools.lru_cache(maxsize=None)
def _module_regex(key: str) -> re.Pattern:
    try:
        return re.compile(rf"(?:{key})(?:\..*)?")
    except re.error as exc:
        raise ValueError(
            f"llm_int8_skip_modules / modules_to_not_convert entry {key!r} is not a valid regular expression "
            f"({exc}); transformers 5.x matches these entries as regexes, so escape it (re.escape) or fix it"
        ) from exc
