"""4-bit MoE routers (transformers 5.x), as transformers 4.x stored them.

transformers 4.x built most MoE routers as ``nn.Linear`` (qwen3_moe, mixtral ``mlp.gate``), so
``load_in_4bit`` made them ``Linear4bit``. From 5.0 a router is its own module holding a plain 2D ``weight``
(num_experts, hidden) that it applies with ``F.linear(hidden, self.weight)``; bitsandbytes converts only
``nn.Linear``, so the router stays 16/32-bit. Small (E x H per layer), but the only tensor class that made a 5.x
4-bit load larger than 4.57's (on a Qwen3-30B-A3B-shaped model: 0.5 MiB bf16 vs 0.14 MiB 4-bit per layer).

The router weight is stored the way the shims store experts (packed bitsandbytes data + QuantState as the
``original`` of a dequantizing parametrization, see :mod:`shims.quant.storage`), so the router's own forward runs
unchanged. It dequantizes to the router's own dtype, not ``bnb_4bit_compute_dtype``: routers do not cast their
input (qwen3_moe, mixtral, gpt_oss multiply in the model dtype). A router the model keeps wider than its own dtype
(deepseek_v3 and glm4_moe build theirs in float32 whatever the load dtype) is left float: that precision is the
model authors' choice, and 4.x left those routers float too.

A router is found by STRUCTURE, next to an experts module (any stack family, :mod:`shims.quant.storage`): a child of the
same parent holding a 2D ``weight`` whose rows equal an expert group's count (or routed + shared, inkling), with only
per-expert statistics besides it (a bias, a score correction: laguna, ernie4_5_moe, deepseek_v4); nn.Linear
subclasses (phimoe, llama4) count, since bitsandbytes converts only exact nn.Linear. Routers that are an nn.Linear
inside a gating module (afmoe ``router.gate``, hunyuan ``gate.wg``, jetmoe ``router.layer``, gemma4 ``router.proj``),
the layers of a gating network (zaya: ``gate.down_proj``, ``gate.router_mlp.fc1`` / ``fc2`` / ``out_proj``, scoring
its experts + 1 skip expert) or an nn.Linear child become bitsandbytes' own Linear4bit: they are counted, never
re-stored by the shims (:func:`is_router_path` sees routers at most two levels below the MoE block: the ones the
shims store or reload themselves). Keep
routers in 16/32-bit as on 4.x: list them in ``llm_int8_skip_modules`` (e.g. ``["gate"]``, ``["router"]``).
Pre-quantized checkpoints are loaded as saved (see :mod:`shims.quant.checkpoint`); float routers in them stay float.
"""

from __future__ import annotations

import logging
import re

from .bnb_config import QuantSettings, is_bnb_4bit, is_skipped, settings_of, skip_patterns
from .forward import PARAMETRIZE_CACHE_TARGETS
from ..loader_generation import V5, targets_for, transformers_loader
from .loader_v5 import AFTER_LOAD_TARGET, SET_PARAM_TARGET, WARMUP_SIZE_TARGET, loader_hooks, v5_loader_needed
from ..registry import Patch, chain_undo, swap_attr
from .storage import (
    ExpertQuantError,
    base_module,
    config_expert_counts,
    expert_weight_names,
    flat_stacks,
    install_packed_param,
    iter_expert_modules,
    quant_state_bytes,
    quantized_parametrization,
    raw_tensor,
)

log = logging.getLogger("shims")

ROUTER_WEIGHT = "weight"


def _group_counts(module, names, expert_counts) -> set:
    """The expert count of one experts module: the leading size of its 3D stacks; for stacks flattened to 2D
    (dbrx (E * F, H)), the config's expert counts that divide their rows."""
    param = quantized_parametrization(module, names[0])
    shape = param.logical_shape if param is not None else tuple(raw_tensor(module, names[0]).shape)
    if len(shape) == 3:
        return {shape[0]}
    return {e for e in expert_counts if shape[0] % e == 0}


def _expert_counts(children: dict, expert_counts=()) -> tuple[set, set]:
    """(names of the expert modules among ``children``, the row counts a router next to them may have): each expert
    group's count, and where several fused experts modules sit side by side (inkling: routed + shared stacks) their
    sum, for a router scoring all of them. A child that only contains an experts module (dbrx ``ffn.experts`` holds
    ``mlp`` with the flattened stacks) counts as one. A count of 1 is no routing decision."""
    siblings = [base_module(child) for child in children.values()]
    experts, counts, fused = set(), set(), []
    for name, child in children.items():
        child = base_module(child)
        names = expert_weight_names(child, siblings, expert_counts)
        if names:
            experts.add(name)
            group = _group_counts(child, names, expert_counts)
            counts |= group
            if len(names) > 1 and len(group) == 1:
                fused.append(next(iter(group)))
            continue
        for _, inner in child.named_modules():
            inner_names = flat_stacks(inner, expert_counts)
            if inner_names:
                experts.add(name)
                counts |= _group_counts(inner, inner_names, expert_counts)
    if len(fused) > 1:
        counts.add(sum(fused))
    return experts, {c for c in counts if c > 1}


def is_bnb_linear(module) -> bool:
    """A module bitsandbytes' loader converts itself: exactly nn.Linear (it checks the type, not subclasses), or
    the Linear4bit it became."""
    import torch
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return type(module) is torch.nn.Linear or isinstance(module, (Linear4bit, Linear8bitLt))


def _float_tensors(module, recurse: bool):
    tensors = list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse))
    return [t for t in tensors if t is not None and (t.is_floating_point() or t.device.type == "meta")]


def router_shape(module) -> tuple | None:
    """The logical (rows, cols) of ``module``'s router weight, or None when it is not a router the shims store:
    a module (nn.Linear subclasses included, which bitsandbytes leaves float) holding a 2D float (or shim 4-bit)
    ``weight``; besides it only per-expert statistics (float tensors of at most ``rows`` elements: a bias, a score
    correction, a scale), and in sub-modules nothing larger (ernie's ``moe_statics``). Integer buffers (deepseek_v4's
    token -> expert hash table) are not weights."""
    if is_bnb_linear(module):
        return None  # bitsandbytes' own (Linear4bit); see routers_of
    param = quantized_parametrization(module, ROUTER_WEIGHT)
    if param is not None:
        shape = param.logical_shape
    else:
        weight = module._parameters.get(ROUTER_WEIGHT)
        if weight is None or weight.dim() != 2 or not (weight.is_floating_point() or weight.device.type == "meta"):
            return None
        shape = tuple(weight.shape)
    rows = shape[0]
    own = [t for n, t in module.named_parameters(recurse=False) if n != ROUTER_WEIGHT]
    own += [t for n, t in module.named_buffers(recurse=False)]
    own = [t for t in own if t is not None and (t.is_floating_point() or t.device.type == "meta")]
    inner = [t for name, child in module.named_children() if name != "parametrizations"
             for t in _float_tensors(child, recurse=True)]
    if any(t.numel() > rows for t in own + inner):
        return None
    return shape


def _scores_expert_classes(container, rows: int, counts) -> bool:
    """True when a layer with ``rows`` outputs inside ``container`` scores the expert classes: as many as an expert
    group, or more (experts that compute nothing: zaya's skip expert, longcat_flash's zero experts) with a per-class
    statistic of exactly that length held by the container itself (zaya ``balancing_biases``, longcat_flash
    ``e_score_correction_bias``)."""
    if rows in counts:
        return True
    if not counts or rows <= min(counts):
        return False
    own = list(container.parameters(recurse=False)) + list(container.buffers(recurse=False))
    return any(t is not None and t.is_floating_point() and t.dim() == 1 and t.numel() == rows for t in own)


def _matrices(module):
    """(owner path, tensor name) of every matrix under ``module``: 2D or more, bitsandbytes' packed Params4bit, and
    a shim 4-bit tensor under its logical name (``x.parametrizations.weight.original`` is ``x``'s ``weight``)."""
    for name, param in module.named_parameters():
        if param.dim() < 2 and type(param).__name__ != "Params4bit":
            continue
        parts = name.split(".")
        if "parametrizations" in parts:
            at = parts.index("parametrizations")
            yield ".".join(parts[:at]), parts[at + 1]
        else:
            yield ".".join(parts[:-1]), parts[-1]


def _router_linears(module, counts) -> list[str]:
    """The relative paths of the linear layers of a router container, or [] when ``module`` is none.

    A router container holds only linear layers as matrices (norms, scales and statistics besides), and exactly one of
    them is its output layer (no other of its layers reads that many features), which scores the expert classes
    (:func:`_scores_expert_classes`). Most hold that one layer (afmoe ``router.gate``, hunyuan ``gate.wg``, jetmoe
    ``router.layer``, gemma4 ``router.proj``, longcat_flash ``router.classifier``); zaya's router is a small network
    (``down_proj``, then ``router_mlp.fc1`` / ``fc2`` / ``out_proj`` over experts + 1 skip expert), every layer of
    which is a router weight."""
    import torch

    matrices = list(_matrices(module))
    if not matrices:
        return []
    linears = {}
    for path, leaf in matrices:
        owner = module.get_submodule(path) if path else module
        if not path or leaf != ROUTER_WEIGHT or not isinstance(owner, torch.nn.Linear):
            return []
        linears[path] = owner
    outputs = [path for path, linear in linears.items()
               if not any(other.in_features == linear.out_features for p, other in linears.items() if p != path)]
    if len(outputs) != 1 or not _scores_expert_classes(module, linears[outputs[0]].out_features, counts):
        return []
    return list(linears)


def routers_of(parent, expert_counts=()) -> list[tuple[str, object]]:
    """(relative path, module) of every router next to an experts module directly under ``parent``: a child whose
    2D weight has as many rows as an expert group (:func:`router_shape`), an nn.Linear child with that many outputs
    (bitsandbytes quantizes it as Linear4bit), or the linear layers of a router container (:func:`_router_linears`)."""
    children = dict(parent.named_children())
    experts, counts = _expert_counts(children, expert_counts)
    if not counts:
        return []  # the common case while loading: most tensors' parents hold no experts
    found = []
    for name, child in children.items():
        if name in experts:
            continue
        if is_bnb_linear(child):
            if child.out_features in counts:
                found.append((name, child))
            continue
        shape = router_shape(child)
        if shape is not None:
            if shape[0] in counts:
                found.append((name, child))
            continue
        found.extend((f"{name}.{inner}", child.get_submodule(inner)) for inner in _router_linears(child, counts))
    return found


def iter_routers(model):
    """(path, module) for every MoE router of ``model`` (one per fused experts module's parent)."""
    counts = config_expert_counts(getattr(model, "config", None))
    for parent_path in sorted({path.rpartition(".")[0] for path, _ in iter_expert_modules(model)}):
        found = _routers_under(model, parent_path, counts)
        if not found and parent_path:  # dbrx: the router sits next to the module holding the experts module
            parent_path = parent_path.rpartition(".")[0]
            found = _routers_under(model, parent_path, counts)
        yield from found


def _routers_under(model, parent_path: str, counts) -> list:
    parent = model.get_submodule(parent_path) if parent_path else model
    return [((f"{parent_path}.{name}" if parent_path else name), module) for name, module in routers_of(parent, counts)]


def is_router_path(model, module_path: str) -> bool:
    """True when ``module_path`` is a router of ``model`` (a child of an experts module's parent, or a linear layer
    inside such a child). Deeper layers of a router network (zaya's ``gate.router_mlp.*``) are not looked for: they
    are bitsandbytes' own Linear4bit, which the shims neither store nor reload, and every level more would scan a
    larger part of the model for each weight loaded."""
    parts = module_path.split(".")
    for depth in (1, 2):
        parent_path, relative = ".".join(parts[:-depth]), ".".join(parts[-depth:])
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        counts = config_expert_counts(getattr(model, "config", None))
        if any(name == relative for name, _ in routers_of(parent, counts)):
            return True
    return False


def _model_dtype(model):
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else weight.dtype


def declared_fp32_strict(model, path: str) -> bool:
    """True when the model declares the router weight at ``path`` (a module path) float32 in a half-precision load
    (``_keep_in_fp32_modules_strict``, e.g. ergo's ``mlp.gate.linear.weight``). Matched as transformers matches it:
    each entry searched in the parameter name, ``*`` for any run of characters."""
    name = f"{path}.{ROUTER_WEIGHT}"
    patterns = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    return any(re.search(re.escape(p).replace(r"\*", ".*"), name) for p in patterns)


def _load_dtype(model):
    """The dtype the model is loaded in: ``config.dtype``, which from_pretrained sets before any weight loads. Not the
    embeddings' dtype here: a model may keep those float32 as well (ergo)."""
    import torch

    dtype = getattr(getattr(model, "config", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def kept_wide(model, module, path: str | None = None) -> bool:
    """True for a float router the model keeps wider than its own dtype: routing precision chosen by the model's
    authors, so it is left as is, as transformers 4.x left it. Either the router is wider than the input embeddings
    (deepseek_v3 and glm4_moe build theirs in float32 whatever the load dtype), or, given its ``path``, the model
    declares it float32 in a half-precision load (ergo keeps router AND embeddings float32, so only the declaration
    tells). In a float32 load the declaration changes nothing, as in transformers: the router has the model's dtype."""
    import torch

    weight = module._parameters.get(ROUTER_WEIGHT)
    if weight is None or not weight.is_floating_point():
        return False
    if path is not None and _load_dtype(model) in (torch.float16, torch.bfloat16) and declared_fp32_strict(model, path):
        return True
    model_dtype = _model_dtype(model)
    return model_dtype is not None and weight.dtype.itemsize > model_dtype.itemsize


def claimed_router_weight(hf_quantizer, model, tensor_path: str):
    """(module path, module) when ``tensor_path`` is a router weight this bnb 4-bit load should quantize."""
    if getattr(hf_quantizer, "pre_quantized", False):
        return None  # a saved 4-bit checkpoint is loaded as saved: its float routers stay float
    return four_bit_router_weight(hf_quantizer, model, tensor_path)


def four_bit_router_weight(hf_quantizer, model, tensor_path: str):
    """(module path, module) when ``tensor_path`` is a router weight that a bnb 4-bit load stores in 4 bits
    (quantized now, or already saved so), i.e. a router not in the quantizer's modules_to_not_convert."""
    if hf_quantizer is None or model is None or not is_bnb_4bit(hf_quantizer):
        return None
    module_path, _, name = tensor_path.rpartition(".")
    if name != ROUTER_WEIGHT or not module_path or not is_router_path(model, module_path):
        return None
    module = model.get_submodule(module_path)
    if is_bnb_linear(module):
        return None  # bitsandbytes' own
    if is_skipped(module_path, skip_patterns(hf_quantizer)) or kept_wide(model, module, module_path):
        return None
    return module_path, module


def quantize_router(module, settings: QuantSettings, owner: str) -> None:
    """Replace the router's float 2D weight by packed 4-bit storage dequantizing to the router's own dtype."""
    import bitsandbytes.functional as F
    import torch

    if quantized_parametrization(module, ROUTER_WEIGHT) is not None:
        return
    weight = module._parameters.get(ROUTER_WEIGHT)
    if weight is None or weight.dim() != 2 or not weight.is_floating_point():
        got = None if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
        raise ExpertQuantError(f"{owner}.{ROUTER_WEIGHT}: expected a float 2D router weight, got {got}")
    packed, state = F.quantize_4bit(weight.detach().contiguous(), blocksize=settings.blocksize,
                                    compress_statistics=settings.compress_statistics,
                                    quant_type=settings.quant_type,
                                    quant_storage=settings.quant_storage or torch.uint8)
    install_packed_param(module, ROUTER_WEIGHT, packed, state, owner=owner)
    log.debug("quantized router %s %s -> 4-bit %s", owner, tuple(state.shape), settings.quant_type)


def quantize_model_routers(model, quantization_config, skip_modules=()) -> int:
    """Quantize every float router weight of a loaded model (not in ``skip_modules``); returns how many."""
    settings = QuantSettings.from_bnb_config(quantization_config)
    done = 0
    for path, module in list(iter_routers(model)):
        if is_bnb_linear(module):
            continue  # bitsandbytes' own: Linear4bit, or float where its skip list says so
        weight = module._parameters.get(ROUTER_WEIGHT)
        if (weight is None or weight.device.type == "meta" or is_skipped(path, skip_modules)
                or kept_wide(model, module, path)):
            continue
        quantize_router(module, settings, path)
        done += 1
    return done


def router_storage(model) -> dict:
    """How many routers, how many are stored 4-bit (by the shims, or by bitsandbytes as a Linear4bit), how many the
    model keeps wider than its dtype (left float on purpose, see kept_wide), and their stored bytes."""
    counts = dict(routers=0, quantized=0, kept_wide=0, bytes=0)
    for path, module in iter_routers(model):
        counts["routers"] += 1
        counts["kept_wide"] += kept_wide(model, module, path)
        raw = raw_tensor(module, ROUTER_WEIGHT)
        counts["bytes"] += raw.numel() * raw.element_size()
        param = quantized_parametrization(module, ROUTER_WEIGHT)
        state = param.quant_state if param is not None else getattr(raw, "quant_state", None)  # Params4bit's own
        if state is not None:
            counts["quantized"] += 1
            counts["bytes"] += quant_state_bytes(state)
    return counts


# --------------------------------------------------------------------------------------------------------------
# routers whose gating module reads the linear layer's weight itself


def reads_weight_as_tensor(container, child: str) -> bool:
    """True when ``container``'s class reads ``self.<child>.weight`` itself instead of calling that layer
    (longcat_flash's router: ``F.linear(hidden_states.type(torch.float32), self.classifier.weight.type(...))``); a
    Linear4bit there hands over its packed bytes and the 4-bit forward fails. Read from the source of the class and
    its bases up to nn.Module: upstream calling the layer instead turns this off. A class without source (made at run
    time) is taken as calling its layers."""
    import inspect
    import re

    import torch

    pattern = re.compile(rf"\bself\.{re.escape(child)}\.{ROUTER_WEIGHT}\b")
    for cls in type(container).__mro__:
        if cls is torch.nn.Module:
            break
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def linear4bit_routers_read_as_tensors(model) -> list[tuple[str, object]]:
    """(path, Linear4bit) of every router that bitsandbytes stored as its own Linear4bit while its gating module reads
    the weight as a tensor (:func:`reads_weight_as_tensor`)."""
    from bitsandbytes.nn import Linear4bit

    found = []
    for path, module in iter_routers(model):
        container_path, _, child = path.rpartition(".")
        if not isinstance(module, Linear4bit) or "." in child or not container_path:
            continue
        if reads_weight_as_tensor(model.get_submodule(container_path), child):
            found.append((path, module))
    return found


def restore_router_read_as_tensor(model, path: str, linear4bit) -> None:
    """Replace the Linear4bit router at ``path`` by an nn.Linear whose ``weight`` is the shims' 4-bit storage of the
    same packed bytes and QuantState (nothing re-quantized): reading it dequantizes, so the gating module's own
    ``F.linear(x, self.<child>.weight)`` gets the float weight, and calling the layer works as before."""
    import torch

    weight = linear4bit.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ExpertQuantError(f"{path}.{ROUTER_WEIGHT}: a Linear4bit router without its quantization state")
    linear = torch.nn.Linear(linear4bit.in_features, linear4bit.out_features, bias=linear4bit.bias is not None,
                             device="meta", dtype=state.dtype)
    if linear4bit.bias is not None:
        linear.bias = linear4bit.bias
    install_packed_param(linear, ROUTER_WEIGHT, weight.data, state, owner=path)
    linear._is_hf_initialized = True  # loaded: transformers must not initialise it again
    container_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(container_path), child, linear)
    log.debug("router %s: read as a tensor by its gating module, stored by the shims (4-bit, dequantized on read)",
              path)


def restore_routers_read_as_tensors(model) -> int:
    found = linear4bit_routers_read_as_tensors(model)
    for path, module in found:
        restore_router_read_as_tensor(model, path, module)
    return len(found)


# --------------------------------------------------------------------------------------------------------------
# the patch


def _router_needed() -> str | None:
    if transformers_loader() != V5:
        return ("transformers 4.x builds routers as nn.Linear (quantized natively, Linear4bit) or keeps plain "
                "float routers (gpt_oss, deepseek_v3, glm4_moe) as 4.x always did")
    return v5_loader_needed()


def _quantize_claimed_router(model, target_name, param_value, hf_quantizer) -> None:
    claimed = claimed_router_weight(hf_quantizer, model, target_name)
    if claimed is None:
        return
    module_path, module = claimed
    weight = module._parameters.get(ROUTER_WEIGHT)
    if weight is not None and weight.is_floating_point() and weight.device.type != "meta":
        quantize_router(module, settings_of(hf_quantizer), module_path)


def missing_routers_sweep(hf_quantizer, model) -> int:
    """Routers that did not pass through set_param_for_module (missing from the checkpoint -> initialised); a
    pre-quantized checkpoint is loaded as saved."""
    if getattr(hf_quantizer, "pre_quantized", False):
        return 0
    return quantize_model_routers(model, hf_quantizer.quantization_config, skip_patterns(hf_quantizer))


def _install():
    return chain_undo(loader_hooks(
        _quantize_claimed_router, missing_routers_sweep,
        lambda quantizer, model, name: four_bit_router_weight(quantizer, model, name) is not None))


def _install_weight_reads():
    from functools import wraps

    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    original_after = Bnb4BitHfQuantizer._process_model_after_weight_loading

    @wraps(original_after)
    def process_model_after_weight_loading(self, model, **kwargs):
        if is_bnb_4bit(self):  # a fresh 4-bit load and a saved 4-bit checkpoint alike
            n = restore_routers_read_as_tensors(model)
            if n:
                log.info("%d routers read as tensors by their gating module: stored by the shims (router_weight_reads)",
                         n)
        return original_after(self, model, **kwargs)

    return chain_undo([swap_attr(Bnb4BitHfQuantizer, "_process_model_after_weight_loading",
                                 process_model_after_weight_loading)])


def _weight_reads_needed() -> str | None:
    if transformers_loader() != V5:
        return ("transformers 4.x's loader is not hooked for it: a router whose gating module reads its Linear4bit's "
                "weight (longcat_flash) fails there as upstream; keep it float with llm_int8_skip_modules")
    return v5_loader_needed()


PATCHES: tuple = (
    Patch(
        name="quantize_moe_routers",
        summary="BitsAndBytesConfig(load_in_4bit) also stores MoE router weights (5.x: plain 2D params, 4.x: "
                "nn.Linear -> Linear4bit) in 4-bit, as 4.x did; llm_int8_skip_modules keeps them float",
        # Routers became plain parameters together with the fused experts (transformers 5.0): on 4.x they are
        # nn.Linear (quantized natively) or, where they were already plain (gpt_oss, deepseek_v3), left float.
        **targets_for(V5, required=(SET_PARAM_TARGET, AFTER_LOAD_TARGET) + PARAMETRIZE_CACHE_TARGETS,
                      optional=(WARMUP_SIZE_TARGET,)),
        needed=_router_needed,
        install=_install,
    ),
    Patch(
        name="router_weight_reads",
        summary="a router whose gating module reads its linear layer's weight as a tensor (longcat_flash: "
                "F.linear(h, self.classifier.weight)) is stored by the shims (same 4-bit bytes, dequantized on read) "
                "instead of as a Linear4bit, whose weight is packed bytes",
        **targets_for(V5, required=(AFTER_LOAD_TARGET,) + PARAMETRIZE_CACHE_TARGETS),
        needed=_weight_reads_needed,
        install=_install_weight_reads,
    ),
)
