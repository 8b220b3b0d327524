"""causal_lm_backbone: trl's fused LM head runs ``model.base_model`` and reads ``last_hidden_state`` from it.

``PreTrainedModel.base_model`` is ``getattr(self, self.base_model_prefix, self)``. Llama4ForCausalLM declares
``base_model_prefix = "language_model"`` (so that the text weights of a Llama4ForConditionalGeneration checkpoint,
stored under ``language_model.``, load into it) but keeps its decoder in ``self.model``: its ``base_model`` is the
causal LM itself. trl 1.16's SFTTrainer (``add_fused_lm_head``, always on) calls that backbone and then reads
``.last_hidden_state`` of a ``MoeCausalLMOutputWithPast``: ``AttributeError`` at the first training step, with or
without the other shims.

The patch gives such classes a ``base_model`` property that returns the decoder they hold in ``model``, as every
causal LM whose prefix is ``"model"`` already does. ``base_model_prefix`` is unchanged, so checkpoint loading is not
affected. A class needs it when its ``__init__`` assigns ``self.model`` and never ``self.<base_model_prefix>``
(read from its source); needed where the installed trl's fused LM head calls ``base_model`` (read from its files).
"""

from __future__ import annotations

import inspect
import logging
import re
import textwrap

from ..registry import Patch, Target, chain_undo, package_source_matches, present_holders, swap_attr

log = logging.getLogger("shims")

# causal LMs of transformers 5.24 whose base_model is themselves (the tests check every one the source shows)
_CLASSES = (("transformers.models.llama4.modeling_llama4", "Llama4ForCausalLM"),)
TARGETS = tuple(Target(module, f"{cls}.base_model") for module, cls in _CLASSES)
_FUSED_HEAD_BACKBONE = re.compile(r"backbone_attr\s*=\s*\"base_model\"")


def trl_fused_head_uses_base_model() -> bool:
    """True when the installed trl's fused LM head calls the model's ``base_model`` (from its files, no import)."""
    return package_source_matches("trl", "trainer/utils.py", _FUSED_HEAD_BACKBONE)


def backbone_missing(cls: type) -> bool:
    """True when ``cls.__init__`` stores its decoder as ``self.model`` but never sets ``self.<base_model_prefix>``
    (so ``base_model`` falls back to the model itself)."""
    prefix = getattr(cls, "base_model_prefix", "")
    if not prefix or prefix == "model":
        return False
    try:
        source = textwrap.dedent(inspect.getsource(cls.__init__))
    except (OSError, TypeError):
        return False
    return "self.model = " in source and f"self.{prefix} = " not in source


def affected_classes() -> list[type]:
    return [cls for _, cls in present_holders(TARGETS) if backbone_missing(cls)]


def _decoder(self):
    return self.model


def _needed() -> str | None:
    if not trl_fused_head_uses_base_model():
        return "the installed trl has no fused LM head calling base_model (or trl is not installed)"
    if not affected_classes():
        return "every declared causal LM's base_model is its decoder"
    return None


def _install():
    undos = []
    for cls in affected_classes():
        undos.append(swap_attr(cls, "base_model", property(_decoder, doc="the decoder held in self.model")))
        log.debug("shims: %s.base_model is its decoder (self.model)", cls.__name__)
    return chain_undo(undos)


PATCHES = (
    Patch(
        name="causal_lm_backbone",
        summary="Llama4ForCausalLM.base_model is its decoder (self.model), as for other causal LMs, so trl's fused "
                "LM head (trl 1.16 SFTTrainer) gets hidden states instead of the causal LM's own output",
        targets=(),
        optional_targets=TARGETS,
        needed=_needed,
        install=_install,
    ),
)
