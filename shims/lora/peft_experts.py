"""peft LoRA (``target_parameters``) on shim-quantized 4-bit experts.

Three upstream behaviours break LoRA on parametrized (4-bit) expert tensors, peft 0.18.1 ... 0.21.2:

1. Matching. ``BaseTuner._inject_parameters`` handles modules that have ``parametrizations`` in a separate branch that
   only matches a target key whose module part equals the FULL module name; suffix keys such as
   ``"mlp.experts.gate_up_proj"`` never match and no LoRA is attached, silently. We inject the quantized expert
   tensors ourselves (same matching rule as peft's standard branch: exact key or ``.key`` suffix) through peft's own
   ``_create_and_replace``, in the order peft's standard branch uses (gate_up inner, down outer), so adapter keys are
   identical to those of an unquantized model.
2. Stale cache. ``ParamWrapper._activate_lora`` registers its LoRA proxy with ``unsafe=False``; on a tensor that is
   already parametrized torch then evaluates it, and inside an outer wrapper's ``parametrize.cached()`` that value
   (without the inner LoRA) is cached and later returned to the experts forward: the gate_up LoRA would have no
   effect. We drop that one cache entry right after registration.
3. Removal. ``ParamWrapper._remove_parametrizations`` removes only ``_LoraParameterProxy`` when a tensor has several
   parametrizations; peft 0.21 may register a ``_LoraFactorsProxy`` instead, which then stays and piles up on every
   forward. For quantized tensors we remove the topmost non-4-bit parametrization, which is the one peft just added,
   and never our own.

A fourth, for expert stacks stored flattened (patch ``wrapped_tensor_reads``, float or 4-bit): dbrx keeps each
projection of all experts as one 2D ``(E * F, H)`` parameter on ``experts.mlp`` and its experts module reads them as
``self.mlp.w1`` from OUTSIDE that module's forward. Once peft wraps ``experts.mlp`` in ParamWrappers, that read raises
AttributeError (a ParamWrapper does not forward attribute reads), and even if it reached the tensor, the LoRA is only
registered while the wrapper's own forward runs: it would be silently skipped. The patch makes a tensor of the
wrapped module read through its wrapper chain return what the model would compute with: the tensor plus the LoRA of
every wrapper of it that is active, not merged, not disabled (and not already registered by a running forward); plain
number / string attributes of the wrapped module (its sizes, which 4.57's dbrx reads the same way) read as they are.
peft adapts a 2D parameter as one matrix (``delta = B @ A``, B (E * F, r), A (r, H)): expert ``e``'s update is
``B[e * F:(e + 1) * F] @ A``, its own rows of B and one A shared by the experts of that projection; save, reload,
merge and export are peft's 2D LoRA unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager, nullcontext
from functools import wraps

from ..registry import Patch, Target, chain_undo, swap_attr
from ..quant.storage import is_4bit_parametrization, quantized_parametrization, quantized_stack_names

log = logging.getLogger("shims")


def _strip_base_layer(name: str) -> str:
    return name.replace(".base_layer", "")


def _find_wrapper(module, parameter_name: str):
    """The ParamWrapper for ``parameter_name`` in a (possibly nested) wrapper chain, or None."""
    from peft.tuners.lora.layer import ParamWrapper

    while isinstance(module, ParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _matches(key: str, targets) -> bool:
    return key in targets or any(key.endswith("." + t) for t in targets)


def inject_quantized_expert_params(tuner, peft_config, model, adapter_name, low_cpu_mem_usage=False) -> list[str]:
    """Attach LoRA ParamWrappers to shim-quantized expert tensors matching ``target_parameters``; return the keys."""
    from peft.tuners import tuners_utils

    targets = sorted(set(getattr(peft_config, "target_parameters", None) or ()))
    if not targets:
        return []
    quantized = [(name, module) for name, module in model.named_modules() if quantized_stack_names(module)]
    init_empty = getattr(tuners_utils, "init_empty_weights", None)
    ctx = init_empty if (low_cpu_mem_usage and init_empty is not None) else nullcontext
    injected = []
    for current_name, module in quantized:
        path = _strip_base_layer(current_name)  # where the outermost wrapper lives (or will live)
        if not path:
            raise ValueError("Targeting a parameter of the top-level module is not supported")
        for param_name in quantized_stack_names(module):  # registration order, as peft's own branch nests them
            key = f"{path}.{param_name}"
            if not _matches(key, targets):
                continue
            parent_name, _, child_name = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            outer = getattr(parent, child_name)
            target = _find_wrapper(outer, param_name) or outer
            tuner._check_target_module_compatiblity(peft_config, model, child_name)
            with ctx():
                tuner._create_and_replace(peft_config, adapter_name, target, child_name, parent,
                                          current_key=key, parameter_name=param_name)
            injected.append(key)
    log.debug("LoRA attached to %d quantized expert tensors", len(injected))
    return injected


class LoraTargetDropped(ValueError):
    """A ``target_parameters`` entry matched a tensor of the model and peft attached no LoRA to it."""


def _tensor_names(module) -> list[str]:
    """Direct parameters and parametrized tensors (e.g. 4-bit experts, whose parameter moved under
    ``parametrizations``) of one module."""
    names = [n for n, p in module._parameters.items() if p is not None]
    return names + list(getattr(module, "parametrizations", {}) or {})


def dropped_lora_targets(model, peft_config, adapter_name: str) -> list[str]:
    """Keys of the tensors that match ``peft_config.target_parameters`` but carry no LoRA for ``adapter_name``.

    peft skips some matches without a word (tensors it sees through other parametrizations, names its branches do
    not match); a run that trains "all experts" while one projection has no adapter is a silent partial result.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = sorted(set(getattr(peft_config, "target_parameters", None) or ()))
    if not targets:
        return []
    wanted = {t.rsplit(".", 1)[-1] for t in targets}
    dropped = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) or ".lora_" in f".{name}":
            continue
        path = _strip_base_layer(name)
        for param_name in _tensor_names(module):
            key = f"{path}.{param_name}"
            if param_name not in wanted or not _matches(key, targets):
                continue
            wrapper = _find_wrapper(model.get_submodule(path), param_name) if path else None
            if wrapper is None or adapter_name not in getattr(wrapper, "lora_A", {}):
                dropped.append(key)
    return dropped


def needs_4bit_expert_lora() -> str | None:
    """Why LoRA on 4-bit fused experts cannot arise here, or None when it can: the shared need check of the
    patches that adapt, merge into and speed up LoRA on shim-quantized experts."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed: no 4-bit experts to adapt"
    try:
        from peft.tuners.lora.layer import ParamWrapper  # noqa: F401
    except ImportError:
        return "this peft has no ParamWrapper (no LoRA on nn.Parameter targets)"
    # Not conditional on the transformers version: 4.x has fused experts too (gpt_oss), and these patches only act
    # on tensors the shim quantized.
    return None


def _install():
    import torch.nn.utils.parametrize as P
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTuner

    original_inject = BaseTuner._inject_parameters
    original_activate = ParamWrapper._activate_lora
    original_remove = ParamWrapper._remove_parametrizations

    @wraps(original_inject)
    def _inject_parameters(self, peft_config, model, adapter_name, low_cpu_mem_usage, *args, **kwargs):
        ours = inject_quantized_expert_params(self, peft_config, model, adapter_name, low_cpu_mem_usage)
        result = original_inject(self, peft_config, model, adapter_name, low_cpu_mem_usage, *args, **kwargs)
        dropped = dropped_lora_targets(model, peft_config, adapter_name)
        if dropped:
            raise LoraTargetDropped(
                f"target_parameters {sorted(set(getattr(peft_config, 'target_parameters', ())))} match "
                f"{len(dropped)} tensor(s) to which peft attached no LoRA adapter {adapter_name!r}: {dropped[:6]}"
                + (" ..." if len(dropped) > 6 else ""))
        if isinstance(result, list):  # peft >= 0.20 returns the names
            return ours + result
        self.targeted_parameter_names.extend(ours)  # older peft records them on the tuner
        return result

    @wraps(original_activate)
    @contextmanager
    def _activate_lora(self, active_adapters):
        with original_activate(self, active_adapters):
            base = self.get_base_layer()
            if quantized_parametrization(base, self.parameter_name) is not None:
                P._cache.pop((id(base), self.parameter_name), None)
            yield

    @wraps(original_remove)
    def _remove_parametrizations(self):
        base = self.get_base_layer()
        if quantized_parametrization(base, self.parameter_name) is None:
            return original_remove(self)
        plist = base.parametrizations[self.parameter_name]
        for i in reversed(range(len(plist))):
            if not is_4bit_parametrization(plist[i]):
                del plist[i]
                return None
        raise RuntimeError(
            f"{type(base).__name__}.{self.parameter_name}: expected a LoRA parametrization on top of the 4-bit one "
            "to remove, found only the 4-bit one"
        )

    return chain_undo([
        swap_attr(BaseTuner, "_inject_parameters", _inject_parameters),
        swap_attr(ParamWrapper, "_activate_lora", _activate_lora),
        swap_attr(ParamWrapper, "_remove_parametrizations", _remove_parametrizations),
    ])


# --------------------------------------------------------------------------------------------------------------
# wrapped_tensor_reads


class WrappedTensorReadError(RuntimeError):
    """A LoRA delta that does not fit the tensor it adapts, read through its ParamWrapper."""


def _wrapped_tensor(module, name: str) -> bool:
    """Whether ``module`` itself holds a tensor ``name`` (a parameter, a buffer or a parametrized tensor)."""
    return (name in module.__dict__.get("_parameters", {}) or name in module.__dict__.get("_buffers", {})
            or name in (module.__dict__.get("_modules", {}).get("parametrizations") or {}))


def _lora_registered(module, name: str) -> bool:
    """A running ParamWrapper forward has registered its LoRA on ``module.<name>`` (any parametrization that is not
    the shims' 4-bit one)."""
    import torch.nn.utils.parametrize as P

    return P.is_parametrized(module, name) and any(not is_4bit_parametrization(p)
                                                   for p in module.parametrizations[name])


def adapted_read(wrapper, name: str):
    """``wrapper.<name>`` for a tensor of the module the ParamWrapper chain wraps: the tensor (read through the
    inner wrappers, which add their own LoRA) plus this wrapper's active LoRA when ``name`` is its parameter."""
    value = getattr(wrapper.base_layer, name)
    if name != wrapper.parameter_name or wrapper.disable_adapters or wrapper.merged:
        return value
    adapters = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not adapters or _lora_registered(wrapper.get_base_layer(), name):
        return value
    for adapter in adapters:
        delta = wrapper.get_delta_weight(adapter)
        if tuple(delta.shape) != tuple(value.shape):
            raise WrappedTensorReadError(f"{type(wrapper.get_base_layer()).__name__}.{name}: LoRA delta "
                                         f"{tuple(delta.shape)} does not fit the tensor {tuple(value.shape)}")
        value = value + delta
    return value


def _reads_need_forwarding() -> str | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return "this peft has no ParamWrapper (no LoRA on nn.Parameter targets)"
    import torch

    if ParamWrapper.__getattr__ is not torch.nn.Module.__getattr__:
        return "peft's ParamWrapper resolves attribute reads itself"
    return None


def _install_wrapped_tensor_reads():
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    module_getattr = torch.nn.Module.__getattr__

    def __getattr__(self, name: str):
        try:
            return module_getattr(self, name)
        except AttributeError:
            base_layer = self.__dict__.get("_modules", {}).get("base_layer")
            if base_layer is None or name.startswith("_"):  # private and special names stay the wrapper's own
                raise
            inner = base_layer
            while isinstance(inner, ParamWrapper):
                inner = inner.__dict__["_modules"]["base_layer"]
            if _wrapped_tensor(inner, name):
                return adapted_read(self, name)
            value = inner.__dict__.get(name)
            if isinstance(value, (bool, int, float, str)):
                return value  # its sizes (transformers 4.57's DbrxExperts reads self.mlp.moe_num_experts too)
            raise

    __getattr__.__shims_patched__ = True
    return swap_attr(ParamWrapper, "__getattr__", __getattr__)


PATCHES: tuple = (
    Patch(
        name="peft_quantized_experts",
        summary="peft target_parameters LoRA attaches to, trains on and cleans up after 4-bit parametrized experts; "
                "a target_parameters match that gets no LoRA is an error, not a silent drop",
        targets=(
            Target("peft.tuners.tuners_utils", "BaseTuner._inject_parameters",
                   ("peft_config", "model", "adapter_name", "low_cpu_mem_usage")),
            Target("peft.tuners.tuners_utils", "BaseTuner._check_target_module_compatiblity",
                   ("peft_config", "model", "target_name")),
            Target("peft.tuners.lora.model", "LoraModel._create_and_replace",
                   ("lora_config", "adapter_name", "target", "target_name", "parent", "current_key",
                    "parameter_name")),
            Target("peft.tuners.lora.layer", "ParamWrapper._activate_lora", ("active_adapters",)),
            Target("peft.tuners.lora.layer", "ParamWrapper._remove_parametrizations"),
            # torch's private parametrize cache, from which _activate_lora drops the stale entry (point 2 above)
            Target("torch.nn.utils.parametrize", "_cache"),
        ),
        needed=needs_4bit_expert_lora,
        install=_install,
    ),
    Patch(
        name="wrapped_tensor_reads",
        summary="a tensor of a module peft wraps in ParamWrappers, read through the wrapper (dbrx's experts read "
                "their flattened w1/v1/w2 as self.mlp.w1), is found and carries its active LoRA (natively: "
                "AttributeError)",
        targets=(
            Target("peft.tuners.lora.layer", "ParamWrapper.__getattr__"),  # nn.Module's until the patch replaces it
            Target("peft.tuners.lora.layer", "ParamWrapper.get_delta_weight", ("adapter_name",)),
            Target("peft.tuners.lora.layer", "ParamWrapper.parameter_name", on_instances=True),
        ),
        needed=_reads_need_forwarding,
        install=_install_wrapped_tensor_reads,
    ),
)
