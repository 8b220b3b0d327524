"""moe-shims: compatibility fixes for LoRA / QLoRA fine-tuning of MoE models.

    import shims
    shims.apply()      # before loading the model; returns the status of every patch
    shims.status()     # what applied, what did not and why, and the upstream symbols checked
    shims.restore()    # undo everything

Importing this package is cheap: torch, transformers, peft and bitsandbytes are imported only when
apply(), status() or one of the tools runs. Library code logs to the "shims" logger and is silent unless
logging is configured.
"""

from __future__ import annotations

import logging

__version__ = "0.3.0"

logging.getLogger("shims").addHandler(logging.NullHandler())

_registry = None


def _get_registry():
    global _registry
    if _registry is None:
        from .patches import build_registry

        _registry = build_registry()
    return _registry


def apply(only=None) -> list[dict]:
    """Apply every patch that is needed on the installed versions (idempotent); return status()."""
    _get_registry().apply(only)
    return status()


def restore() -> None:
    """Undo every applied patch, the last applied first (see shims.registry.Registry.restore)."""
    _get_registry().restore()


def status() -> list[dict]:
    """One dict per patch: name, summary, applied, reason, drift (upstream symbol -> ok/missing/changed)."""
    return [s.as_dict() for s in _get_registry().status()]


def save_merged(model, save_directory, dtype=None, **kwargs):
    """Write a merged 16-bit checkpoint of a PeftModel; see shims.merging.export.save_merged."""
    from .merging.export import save_merged as _save_merged

    return _save_merged(model, save_directory, dtype=dtype, **kwargs)


def convert_adapter(src_dir, dst_dir, to, **kwargs):
    """Convert a saved adapter between expert LoRA layouts; see shims.adapters.adapter_convert.convert_adapter."""
    from .adapters.adapter_convert import convert_adapter as _convert_adapter

    return _convert_adapter(src_dir, dst_dir, to=to, **kwargs)


def check_adapter(adapter_dir, engine, **kwargs):
    """Whether an engine (vllm / sglang / transformers) reads an adapter's expert LoRA layout, and the conversion that
    fixes it; see shims.adapters.engine_check.check_adapter."""
    from .adapters.engine_check import check_adapter as _check_adapter

    return _check_adapter(adapter_dir, engine, **kwargs)


__all__ = ["__version__", "apply", "restore", "status", "save_merged", "convert_adapter", "check_adapter"]
