"""shims.quant.bnb_config: llm_int8_skip_modules / modules_to_not_convert matched by the installed loader's rules."""

from __future__ import annotations

import pytest

from shims.quant import bnb_config
from shims.loader_generation import V4, V5


@pytest.mark.parametrize("module_name, patterns", [
    ("model.layers.1.mlp.experts", ["model.layers.1.mlp.experts"]),  # the module itself
    ("model.layers.1.mlp.experts", ["model.layers.1"]),  # a prefix up to a module boundary
    ("model.layers.1.mlp.gate", ["gate"]),  # a suffix from a module boundary
    ("model.layers.7.mlp.experts", [r"model\.layers\.[0-9]+\.mlp\.experts"]),  # a regex
])
def test_v5_rules_skip(module_name, patterns):
    assert bnb_config.matches_v5_skip_rules(module_name, patterns)


@pytest.mark.parametrize("module_name, patterns", [
    ("model.layers.11.mlp.experts", ["model.layers.1"]),  # not at a module boundary
    ("model.layers.1.mlp.gate_proj", ["gate"]),
    ("model.layers.1.mlp.experts", []),
])
def test_v5_rules_keep(module_name, patterns):
    assert not bnb_config.matches_v5_skip_rules(module_name, patterns)


def test_v5_rules_refuse_an_entry_that_is_no_regex():
    with pytest.raises(ValueError, match=r"'mlp\.experts\[' is not a valid regular expression"):
        bnb_config.matches_v5_skip_rules("model.layers.0.mlp.experts", ["lm_head", "mlp.experts["])


def test_v4_rules_match_literally():
    # 4.x's bitsandbytes integration matches substrings, so an entry that is no regex is a legal literal there
    assert bnb_config.matches_v4_skip_rules("model.odd[0].experts", ["odd[0]"])
    assert not bnb_config.matches_v4_skip_rules("model.layers.0.mlp.experts", ["mlp.experts["])
    assert not bnb_config.matches_v4_skip_rules("model.layers.7.mlp.experts", [r"layers\.[0-9]+"])  # no regex
    assert bnb_config.matches_v4_skip_rules("model.layers.1.mlp.experts", ["model.layers.1.mlp.experts"])
    assert bnb_config.matches_v4_skip_rules("model.layers.1.mlp.experts", ["layers.1"])
    assert not bnb_config.matches_v4_skip_rules("model.layers.11.mlp.experts", ["layers.1"])
    assert bnb_config.matches_v4_skip_rules("model.layers.1.mlp.gate", ["gate"])


@pytest.mark.parametrize("loader, raises", [(V5, True), (V4, False)])
def test_is_skipped_follows_the_installed_loader(monkeypatch, loader, raises):
    monkeypatch.setattr(bnb_config, "transformers_loader", lambda: loader)
    if raises:
        with pytest.raises(ValueError, match=r"mlp\.experts\["):
            bnb_config.is_skipped("model.layers.0.mlp.experts", ["mlp.experts["])
    else:
        assert not bnb_config.is_skipped("model.layers.0.mlp.experts", ["mlp.experts["])
