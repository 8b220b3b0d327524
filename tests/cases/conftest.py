"""Fixtures for tests of cases/ (the scripts that run inside a cell's venv)."""

from tests.shims.conftest import bnb_computes_in_its_compute_dtype  # noqa: F401  (autouse: exact fp32 4-bit on any CPU)
