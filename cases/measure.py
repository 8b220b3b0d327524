"""What a case measures: logits divergence, greedy agreement, expert storage, LoRA gradients and memory."""

from __future__ import annotations

import resource

import torch
import torch.nn.functional as F

# The harness's own idea of an expert tensor and of a QuantState's size, deliberately not imported from shims/: a
# checker that took them from the code under test would stop seeing a shim that forgets a family of expert names
# (the expert_family_skipped mutation) or miscounts its bytes. The shims find experts by structure (3D stacks
# sharing an expert dimension); the harness by name and class: a module under an ``experts`` path component
# (transformers' fused experts, 4.x per-expert Linear, dbrx ``experts.mlp``), or whose class is an Expert(s) class
# (jetmoe ``input_linear`` / ``output_linear``, inkling's shared experts), and every weight matrix or stack it holds.
EXPERT_PARAM_NAMES = ("gate_up_proj", "down_proj")
NOT_EXPERT_COMPONENTS = ("router", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "parametrizations")


@torch.no_grad()
def logits(model, batch: dict) -> torch.Tensor:
    model.eval()
    device = device_of(model)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False)
    return out.logits.float().cpu()


def keep_bnb_compute_dtype(model) -> int:
    """Make bitsandbytes' Linear4bit compute in its compute dtype in eval mode too; returns how many it touched.

    On CPUs with AVX512-BF16, bitsandbytes (0.50.x) repacks a Linear4bit's weight on its first eval-mode forward
    and from then on multiplies in bf16 (input and absmax cast to bf16) whatever ``bnb_4bit_compute_dtype`` says.
    The cases compare fp32 models exactly, so they keep the declared compute dtype on every CPU (the flag is
    bitsandbytes' own attribute, read in ``Linear4bit.forward``); a missing attribute means that bitsandbytes has
    no such path and there is nothing to turn off.
    """
    touched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def disable_router_logits(model) -> None:
    """trl turns router logits (and the aux loss) on for training; evaluation and generation need neither,
    and the aux loss is not shape-safe with left padding on some versions."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "output_router_logits", False):
            config.output_router_logits = False


@torch.no_grad()
def round_as_export(model, dtype, store: bool = False) -> None:
    """Round every parameter of a float32 ``model`` as a ``dtype`` export (shims.save_merged) holds it -- those the
    model keeps in float32 in a ``dtype`` model stay exact -- in place: still stored in float32, or (``store``) stored
    in ``dtype``, as the export's folder is."""
    from shims.merging.export import kept_float32

    keep = kept_float32(model, dtype)
    for name, p in model.named_parameters():
        if not (keep and keep.search(name)):
            p.data = p.data.to(dtype) if store else p.data.to(dtype).to(p.dtype)


def kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real tokens of KL(softmax(reference) || softmax(other)), in float64."""
    ref = F.log_softmax(reference.double().cpu(), dim=-1)
    oth = F.log_softmax(other.double().cpu(), dim=-1)
    per_token = (ref.exp() * (ref - oth)).sum(-1)
    m = mask.bool().to(per_token.device)
    return float(per_token[m].mean())


@torch.no_grad()
def greedy(model, tokenizer, texts: list[str], new_tokens: int) -> list[list[int]]:
    model.eval()
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    device = device_of(model)
    out = model.generate(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
    )
    return out[:, enc["input_ids"].shape[1]:].tolist()


def agreement(reference: list[list[int]], other: list[list[int]]) -> str:
    same = sum(1 for a, b in zip(reference, other) if a == b)
    return f"{same}/{len(reference)}"


def is_expert_module(name: str, module=None) -> bool:
    """An experts module by the harness's rule: an ``experts`` path component (not a shared expert MLP), or a class
    named for experts; never a router, a LoRA factor or a parametrization container under one."""
    parts = name.split(".")
    if any(p in NOT_EXPERT_COMPONENTS for p in parts):
        return False
    if module is not None and "Norm" in type(module).__name__:
        return False  # a norm inside an experts module (ergo's per-expert post_expert_norm) holds scales, not weights
    if "experts" in parts:
        return True
    return module is not None and "Expert" in type(module).__name__ and "Router" not in type(module).__name__


def _stored(module, pname: str):
    """(stored tensor, logical shape, QuantState or None) of ``module.<pname>``, seen through a parametrization."""
    containers = getattr(module, "parametrizations", None) or {}
    plist = containers[pname] if pname in containers else None
    if plist is None:
        p = module._parameters[pname]
        state = getattr(p, "quant_state", None) if p.__class__.__name__ == "Params4bit" else None
        return p, (tuple(state.shape) if state is not None else tuple(p.shape)), state
    original = plist.original
    state = next((getattr(q, "quant_state", None) for q in plist if getattr(q, "quant_state", None) is not None), None)
    return original, (tuple(state.shape) if state is not None else tuple(original.shape)), state


def stored_shape(module, pname: str) -> tuple:
    """The logical shape of ``module.<pname>`` (a 4-bit tensor's as its QuantState records it)."""
    return _stored(module, pname)[1]


def expert_tensor_names(module) -> list[str]:
    """The weight tensors (matrices or stacks, not biases) an experts module holds itself, 4-bit ones included."""
    names = [n for n, p in module._parameters.items() if p is not None and "bias" not in n]
    names += [n for n in (getattr(module, "parametrizations", None) or {}) if n not in names and "bias" not in n]
    return [n for n in names if len(_stored(module, n)[1]) >= 2]


def iter_expert_tensors(model):
    """(module path, module, tensor name) of every routed-expert weight tensor (the harness's rule, see above)."""
    for mod_name, module in model.named_modules():
        if not is_expert_module(mod_name, module):
            continue
        for pname in expert_tensor_names(module):
            yield mod_name, module, pname


def quant_state_bytes(state) -> int:
    if state is None:
        return 0
    total = 0
    for attr in ("absmax", "code"):
        t = getattr(state, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def expert_storage(model) -> dict:
    """Count routed-expert weight tensors, how many are 4-bit, and their bytes vs a bf16 copy.

    Independent of the shims: 3D fused float params (transformers 5.x), per-expert nn.Linear / bnb Linear4bit
    (transformers 4.57), and tensors stored under a parametrization whose stored data is not float (the shims'
    4-bit stacks: packed bytes + the QuantState the parametrization carries).
    """
    tensors = quantized = nbytes = bf16_bytes = 0
    for _, module, pname in iter_expert_tensors(model):
        stored, logical, state = _stored(module, pname)
        if not stored.is_floating_point() and stored.device.type != "meta" and state is None:
            raise ValueError(f"{type(module).__name__}.{pname}: {stored.dtype} data without a quantization state")
        tensors += 1
        numel = 1
        for d in logical:
            numel *= d
        bf16_bytes += numel * 2
        nbytes += stored.numel() * stored.element_size()
        if not stored.is_floating_point():
            quantized += 1
            nbytes += quant_state_bytes(state)
    return {"expert_tensors": tensors, "quantized": quantized, "bytes": nbytes, "bf16_bytes": bf16_bytes}


def lora_expert_params(model) -> dict[str, torch.nn.Parameter]:
    """LoRA factors that adapt routed experts (fused ParamWrapper or per-expert Linear)."""
    experts = {name.replace(".base_layer", "") for name, _, _ in iter_expert_tensors(model)}

    def adapted(param_name: str) -> str:  # "...mlp.experts.base_layer.lora_A.default.weight" -> "...mlp.experts"
        return param_name.split(".lora_")[0].replace(".base_layer", "")

    return {n: p for n, p in model.named_parameters()
            if "lora_" in n and p.requires_grad and (is_expert_module(adapted(n)) or adapted(n) in experts)}


def grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(grads).norm())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- the float32 twin (recipe)
class TwinError(AssertionError):
    """The trained model's tensors do not map one to one onto a float32 copy of its architecture."""


def _dequantized(stored, state, *, flat: bool) -> torch.Tensor:
    """A 4-bit tensor's value as the module holding it computes with it. ``flat``: the shims' decode (over the flat
    tensor, reshaped); otherwise bitsandbytes' Linear4bit's own (``dequantize_4bit`` with the logical shape), which on
    CPU (0.50.2) decodes weights whose last dim is not a multiple of 64 differently from the flat decode (measured:
    deepseek_v3's q_b_proj, 32 inputs): the trained model computes with that value, so its twin does too."""
    import copy

    import bitsandbytes.functional as bnbf

    if not flat:
        return bnbf.dequantize_4bit(stored.data, state)
    flat_state = copy.copy(state)
    numel = 1
    for d in state.shape:
        numel *= d
    flat_state.shape = torch.Size([numel])
    return bnbf.dequantize_4bit(stored.data, flat_state).reshape(state.shape)


def base_tensor_values(model) -> dict[str, torch.Tensor]:
    """Every base parameter of a (peft-wrapped) model under its plain transformers name, at the value the model
    computes with: 4-bit tensors (bitsandbytes Params4bit, or stored under a parametrization with a QuantState)
    decoded by bitsandbytes, float ones as stored. LoRA factors and peft's wrapper prefixes are left out."""
    values = {}
    for mod_name, module in model.named_modules():
        parts = mod_name.split(".")
        if any(p.startswith("lora_") or p == "parametrizations" for p in parts):
            continue
        clean = ".".join(p for p in parts if p != "base_layer")
        names = [n for n, p in module._parameters.items() if p is not None]
        names += list(getattr(module, "parametrizations", None) or {})
        for pname in names:
            stored, _, state = _stored(module, pname)
            if state is not None:
                value = _dequantized(stored, state, flat=pname not in module._parameters)
            elif stored.is_floating_point():
                value = stored.detach()
            else:
                raise TwinError(f"{mod_name}.{pname}: {stored.dtype} data without a quantization state")
            values[f"{clean}.{pname}" if clean else pname] = value
    return values


def float32_twin(peft_model, plain_model):
    """``plain_model`` (the same architecture, loaded in float32 without quantization) turned into the trained
    ``peft_model`` computing in float32: its base tensors replaced by the trained model's values cast exactly (bf16 and
    dequantized values are exact in float32), the same LoRA config and factors. The exact reference of a merged
    float32 export of a model trained with bf16 compute: what it computes without bf16 rounding of activations."""
    import copy

    from peft import get_peft_model

    values = base_tensor_values(peft_model.get_base_model())
    params = dict(plain_model.named_parameters())
    missing = sorted(set(params) - set(values))
    if missing:
        raise TwinError(f"{len(missing)} parameter(s) of the float32 copy have no trained value: {missing[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            value = values[name]
            if tuple(value.shape) != tuple(p.shape):
                raise TwinError(f"{name}: trained value {tuple(value.shape)} vs float32 copy {tuple(p.shape)}")
            p.copy_(value.to(device=p.device, dtype=torch.float32))
    adapter = peft_model.active_adapter
    twin = get_peft_model(plain_model, copy.deepcopy(peft_model.peft_config[adapter]), adapter_name=adapter)
    trained = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    factors = {n: p for n, p in twin.named_parameters() if "lora_" in n}
    if trained.keys() != factors.keys():
        raise TwinError(f"LoRA factors differ: only trained {sorted(set(trained) - set(factors))[:3]}, only twin "
                        f"{sorted(set(factors) - set(trained))[:3]}")
    with torch.no_grad():
        for name, p in factors.items():
            p.copy_(trained[name].detach().to(device=p.device, dtype=torch.float32))
    return twin.eval()
