"""Former home of the 4-bit expert code, kept only for callers not yet moved (scripts under cases/, tests/shims/test_recipe.py).

The code lives in :mod:`shims.storage` (the 4-bit storage primitive and its accounting), :mod:`shims.bnb_config`
(BitsAndBytesConfig rules), :mod:`shims.loader_v5` (the transformers 5.x loader patch) and
:mod:`shims.loader_generation` (which loader is installed); import from those. This module can go once nothing
imports it.
"""

from __future__ import annotations

from .storage import dequantize_param, expert_storage, iter_expert_modules, quantize_expert_param

__all__ = ["dequantize_param", "expert_storage", "iter_expert_modules", "quantize_expert_param"]
