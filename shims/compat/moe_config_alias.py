"""expert_count_alias: trl's MoE load-balancing loss reads ``config.num_experts`` on transformers 5.x.

trl (1.x; the fused LM head of 1.16, ``SFTTrainer.compute_loss`` of 1.4) turns the auxiliary loss on for every config
with ``output_router_logits`` and a non-zero ``router_aux_loss_coef``, and then reads the expert count as
``text_config.num_experts``. Several MoE configs name it otherwise (granitemoe, granitemoe_swa, granitemoeshared,
granitemoehybrid, phimoe, llama4: ``num_local_experts``), so the first training step stops with
``AttributeError: '...Config' object has no attribute 'num_experts'`` - with or without the other shims.

The patch gives those config classes the alias Mixtral's config already declares:
``attribute_map["num_experts"] = "num_local_experts"`` (reads and writes go to the real attribute; nothing new is
serialized). The classes are declared targets (drift-checked, shown in ``status()``); of them, only those that still
declare the aux loss, lack ``num_experts`` and name exactly one expert count get it. :func:`scan_affected` finds
every such class of the installed transformers by reading its config modules: the tests check the declared list
covers it. Needed where the installed trl's trainer code reads ``.num_experts`` off a config (read from its files).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import re
from pathlib import Path

from ..registry import Patch, Target, chain_undo, package_source_matches, present_holders, swap_attr

log = logging.getLogger("shims")

ALIAS = "num_experts"
# the other spellings of a routed-expert count in transformers' config classes
EXPERT_COUNT_NAMES = ("num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts", "n_experts")
# what a config class must declare for trl to turn the load-balancing loss on
AUX_LOSS_FIELDS = ("output_router_logits", "router_aux_loss_coef")
_READS_NUM_EXPERTS = re.compile(r"config\.num_experts\b")
# the config classes that need the alias on some 5.x (scan_affected() finds them per version; the tests keep this
# whole): those of 5.24, and gpt_oss, whose config gained the alias upstream after 5.5
_CONFIGS = (
    ("transformers.models.deepseek_v4.configuration_deepseek_v4", "DeepseekV4Config"),
    ("transformers.models.glm4v_moe.configuration_glm4v_moe", "Glm4vMoeTextConfig"),
    ("transformers.models.glm5_next.configuration_glm5_next", "Glm5NextTextConfig"),
    ("transformers.models.gpt_oss.configuration_gpt_oss", "GptOssConfig"),
    ("transformers.models.granitemoe.configuration_granitemoe", "GraniteMoeConfig"),
    ("transformers.models.granitemoe_swa.configuration_granitemoe_swa", "GraniteMoeSWAConfig"),
    ("transformers.models.granitemoehybrid.configuration_granitemoehybrid", "GraniteMoeHybridConfig"),
    ("transformers.models.granitemoeshared.configuration_granitemoeshared", "GraniteMoeSharedConfig"),
    ("transformers.models.llama4.configuration_llama4", "Llama4TextConfig"),
    ("transformers.models.phimoe.configuration_phimoe", "PhimoeConfig"),
)
TARGETS = tuple(Target(module, f"{cls}.attribute_map") for module, cls in _CONFIGS)


def trl_reads_num_experts() -> bool:
    """True when the installed trl's trainer code reads ``<config>.num_experts`` (from its files, no import)."""
    return package_source_matches("trl", "trainer/*.py", _READS_NUM_EXPERTS)


def declared(cls: type) -> set[str]:
    """Attributes a config class declares: dataclass fields (transformers 5.x) or ``__init__`` parameters (4.x)."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls.__init__).parameters)


def alias_target(cls: type) -> str | None:
    """The attribute ``num_experts`` should read for ``cls``, or None when the class needs no alias (it has
    ``num_experts``, declares no aux loss, or its expert count is not one unambiguous attribute)."""
    names = declared(cls)
    if ALIAS in names or ALIAS in getattr(cls, "attribute_map", {}) or not all(f in names for f in AUX_LOSS_FIELDS):
        return None
    counts = [n for n in EXPERT_COUNT_NAMES if n in names]
    return counts[0] if len(counts) == 1 else None


def _config_modules() -> list[str]:
    """transformers config modules whose source declares an aux loss and an expert count under another name
    (a text pre-filter: only those are imported)."""
    import transformers

    found = []
    for path in sorted((Path(transformers.__file__).parent / "models").glob("*/configuration_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if all(f in text for f in AUX_LOSS_FIELDS) and any(n in text for n in EXPERT_COUNT_NAMES):
            found.append(f"transformers.models.{path.parent.name}.{path.stem}")
    return found


def scan_affected() -> list[tuple[str, str]]:
    """(module, class) of every config class of the installed transformers that trl would fail on (slow: imports
    the candidate config modules; for the tests, which check :data:`TARGETS` covers them)."""
    from transformers import PretrainedConfig

    out = []
    for name in _config_modules():
        module = importlib.import_module(name)
        for cls in vars(module).values():
            if isinstance(cls, type) and issubclass(cls, PretrainedConfig) and cls.__module__ == name \
                    and alias_target(cls) is not None:
                out.append((name, cls.__qualname__))
    return out


def affected_classes() -> list[tuple[type, str]]:
    """(config class, the attribute its ``num_experts`` alias reads) for the declared classes that need it here."""
    return [(cls, alias) for _, cls in present_holders(TARGETS) if (alias := alias_target(cls)) is not None]


def _needed() -> str | None:
    if not trl_reads_num_experts():
        return "the installed trl does not read config.num_experts (or trl is not installed)"
    if not affected_classes():
        return "every MoE config class with a load-balancing loss answers num_experts"
    return None


def _install():
    undos = []
    for cls, target in affected_classes():
        undos.append(swap_attr(cls, "attribute_map", {**cls.attribute_map, ALIAS: target}))
        log.debug("shims: %s.num_experts reads %s", cls.__name__, target)
    return chain_undo(undos)


PATCHES = (
    Patch(
        name="expert_count_alias",
        summary="MoE configs that name their expert count num_local_experts (granitemoe*, phimoe, llama4) also "
                "answer num_experts, which trl's load-balancing loss reads on transformers 5.x",
        targets=(),
        # Optional: each transformers release has some of these models; needed() says when none needs the alias.
        optional_targets=TARGETS,
        needed=_needed,
        install=_install,
    ),
)
