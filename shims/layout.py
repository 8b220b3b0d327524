"""Former home of the expert LoRA layout code, kept only for callers not yet moved (cases/portable.py).

The convention lives in :mod:`shims.lora_layout`, saved-adapter detection and conversion in
:mod:`shims.adapter_convert`; import from those. This module can go once nothing imports it.
"""

from __future__ import annotations

from .adapter_convert import detect_adapter_layout
from .lora_layout import expected_layout

__all__ = ["detect_adapter_layout", "expected_layout"]
