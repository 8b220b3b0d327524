"""Does a saved adapter's expert LoRA have the layout a serving engine (or transformers) reads? What will the engine do
with it, and which conversion (or engine option) fixes it.

The engine rules were read from the engines' released sources, not from their documentation, and the engines are
not run here: vLLM :data:`VLLM_VERSION` (PyPI sdist ``vllm-0.34.0.tar.gz``) and SGLang :data:`SGLANG_VERSION` (PyPI
wheel ``sglang-0.5.23``, the newest release on 2026-12-08). Every verdict names its rule (:data:`RULES`) and the
engine files that rule comes from (``cites``: path in the engine's repository @ version). Re-read them when an engine
version moves. Outcomes (:data:`OUTCOMES`), as the engine would show them with its default options:

- ``loads``: read as it is (the only outcome with ``compatible=True``, exit code 0);
- ``loads_with_option``: read once the engine options in ``options`` are set (refused without them).
  ``compatible`` is False and the exit code 1, as for every outcome but "loads": the adapter is not read as it is;
  the verdict names both the options and the conversion that makes it load without them;
- ``refused``: the engine raises while loading or first activating the adapter (``message``: a fragment of its error);
- ``silently_ignored``: loads without an error (vLLM, SGLang: without a warning either) but no expert LoRA reaches
  the experts (every expert LoRA buffer stays zero);
- ``silently_wrong``: loads but the expert deltas are not the trained ones (transformers only: peft 0.18 vs 0.19+
  layouts whose shapes coincide);
- ``unsupported``: the engine reads no expert-LoRA layout that these tools can write for this architecture.

vLLM 0.34.0. Whether an arch's MoE layers take fused 3D expert LoRA is the model class's ``is_3d_moe_weight``
(:data:`VLLM_3D_MOE_ARCHITECTURES`; chosen from the base config's ``architectures``, else from its model_type);
every other MoE arch takes per-expert LoRA (``<block>.experts.N.<proj>``; the block is ``mlp``, mixtral's
``block_sparse_moe``):

============================  =========================================  ====================================
arch group                    adapter layout                             outcome (options / fix)
============================  =========================================  ====================================
2D (qwen3_moe, mixtral,       per-expert, vLLM's block and proj names    loads
deepseek_v2/v3, glm4_moe,     per-expert under another block (mixtral    silently_ignored (rename the block)
qwen3_5_moe text, ...)        ``mlp.experts.N``)
                              per-expert, proj names vLLM does not map   refused ("expected target modules in")
                              fused, standard, at vLLM's experts module  loads_with_option (mixed MoE format
                                                                         + is_3d_lora_weight) or --to per_expert
                              fused at another block (mixtral 5.x        silently_ignored (--to per_expert)
                              ``mlp.experts``; vLLM: block_sparse_moe)
                              fused, swapped (peft 0.18)                 refused (--to per_expert)
3D (gpt_oss, qwen3_5_moe /    fused, standard                            loads
qwen3_vl_moe / qwen3_omni_moe fused, swapped                             refused, shape mismatch (--to standard)
multimodal, interns1_pro)     per-expert                                 loads_with_option (mixed MoE format)
                                                                         or --to fused
any                           fused with only gate_up_proj or down_proj  refused
                              per-expert and fused in one adapter        refused
============================  =========================================  ====================================

SGLang 0.5.23 reads expert LoRA as per-expert 2D tensors (``...experts.N.<proj>``, any block name; w1/w3/w2 keys are
renamed to gate_proj/up_proj/down_proj) or as its own 3D ``experts.<proj>`` tensors, and wraps a model's FusedMoE
only when the adapter's ``target_modules`` name both gate/up and down: per-expert loads; fused (peft
``target_parameters``) is refused ("Cannot find target module name for"); per-expert whose ``target_modules`` name
w1/w2/w3 (transformers 4.57's mixtral) is refused (no LoRA buffer for w1); per-expert whose ``target_modules`` name
only some of gate/up/down is silently ignored; gpt_oss is unsupported (fused only, no per-expert form); a string
``target_modules`` other than "all" / "all-linear" is refused; so is LoRA on q_proj without v_proj in a layer (a
KeyError while SGLang stacks q/k/v, whatever the experts hold).

transformers (not an engine: peft's own loading, measured on the installed lanes): fused ``target_parameters`` LoRA
on 5.x in the layout of the installed peft, per-expert modules on 4.57 (gpt_oss: fused there too, see
:mod:`shims.adapters.adapter_per_expert`); the wrong one of fused / per-expert is silently ignored (a peft warning at most),
the wrong fused layout a size mismatch (refused) or silently wrong where the shapes coincide.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapter_convert import PER_EXPERT, PER_EXPERT_KEY, detect_adapter_layout, read_tensors
from .adapter_per_expert import FUSED_ON_V4
from .base_config import load_base_config
from ..files import read_json
from .lora_layout import STANDARD, SWAPPED, ExpertDims, layout_from_peft_version

ENGINES = ("vllm", "sglang", "transformers")
VLLM_VERSION = "0.34.0"
SGLANG_VERSION = "0.5.23"
ENGINE_VERSIONS = {"vllm": VLLM_VERSION, "sglang": SGLANG_VERSION}
NOT_RUN = "read from source, the engine itself is not run here"
SOURCES = (f"vLLM {VLLM_VERSION} (vllm/lora/*.py, vllm/model_executor/models/*.py), SGLang {SGLANG_VERSION} "
           f"(python/sglang/srt/lora/*.py), {NOT_RUN}")

LOADS, LOADS_WITH_OPTION, REFUSED = "loads", "loads_with_option", "refused"
SILENTLY_IGNORED, SILENTLY_WRONG, UNSUPPORTED = "silently_ignored", "silently_wrong", "unsupported"
OUTCOMES = (LOADS, LOADS_WITH_OPTION, REFUSED, SILENTLY_IGNORED, SILENTLY_WRONG, UNSUPPORTED)

NO_EXPERT_LORA = "none"  # the adapter has no expert LoRA (attention only): every engine reads it
MIXED = "mixed"  # per-expert modules and fused expert LoRA in one adapter
MIXED_LAYOUTS = "mixed_layouts"  # fused expert LoRAs, some standard and some swapped

# vLLM 0.34.0 model classes with is_3d_moe_weight = True (their MoE layers are FusedMoE3DWithLoRA under LoRA)
VLLM_3D_MOE_ARCHITECTURES = frozenset({
    "GptOssForCausalLM",                         # vllm/model_executor/models/gpt_oss.py
    "Qwen3_5MoeForConditionalGeneration",        # qwen3_5.py, vllm/models/qwen3_5/nvidia/model.py
    "Qwen3VLMoeForConditionalGeneration",        # qwen3_vl_moe.py
    "Qwen3OmniMoeForConditionalGeneration",      # qwen3_omni_moe_thinker.py (registered name of the thinker)
    "InternS1ProForConditionalGeneration",       # interns1_pro.py
    "InternS2PreviewForConditionalGeneration",   # interns2_preview.py (a Qwen3_5MoeForConditionalGeneration)
    "ClefOmniForJointSchema",                    # clef_omni.py (a Qwen3OmniMoe thinker)
})
# the same, by model_type, for a base config without ``architectures`` (the HF default class of each model_type);
# Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text) is 2D
VLLM_3D_MOE_MODEL_TYPES = frozenset({"gpt_oss", "qwen3_5_moe", "qwen3_vl_moe", "qwen3_omni_moe"})
VLLM_FUSED_EXPERT_MODEL_TYPES = VLLM_3D_MOE_MODEL_TYPES  # the name earlier versions of this module exported
# the module holding ``experts`` in vLLM's model classes (default "mlp"), and the per-expert projection names an
# adapter may use there: vLLM's checkpoint names plus what the arch's hf_to_vllm_mapper renames to them
_VLLM_MOE_BLOCK = {"mixtral": "block_sparse_moe"}
_VLLM_EXPERT_PROJS = {"mixtral": frozenset({"w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"})}
_DEFAULT_EXPERT_PROJS = frozenset({"gate_proj", "up_proj", "down_proj"})
_EXPERT_PARAMS = frozenset({"gate_up_proj", "down_proj"})

VLLM_MIXED_FORMAT = {"LLM": {"enable_mixed_moe_lora_format": True}, "LoRARequest": {"is_3d_lora_weight": True}}
VLLM_MIXED_FORMAT_2D = {"LLM": {"enable_mixed_moe_lora_format": True}}  # a per-expert adapter on a 3D arch
_W_NAMES = frozenset({"w1", "w2", "w3"})  # transformers 4.57 mixtral's per-expert names


def _cite(engine: str, *refs: str) -> tuple[str, ...]:
    version = ENGINE_VERSIONS[engine]
    return tuple(f"{ref} @ {'vLLM' if engine == 'vllm' else 'SGLang'} {version}" for ref in refs)


_MM = "vllm/lora/model_manager.py"
_SG = "python/sglang/srt/lora"


@dataclass(frozen=True)
class Rule:
    """One engine rule: what it predicts, and the engine files (repo path @ version) it was read from."""

    id: str
    engine: str
    outcome: str
    summary: str
    cites: tuple[str, ...]


def _rules() -> dict[str, Rule]:
    v, s = "vllm", "sglang"
    table = [
        (v, "vllm_no_expert_lora", LOADS, "no expert LoRA: nothing expert-specific is checked",
         (f"{_MM}: LoRAModelManager._create_merged_loras_inplace",)),
        (v, "vllm_per_expert", LOADS, "2D MoE arch, per-expert LoRA under vLLM's block and projection names: packed "
         "into the experts module's per-expert buffers",
         ("vllm/lora/utils.py: process_packed_modules_mapping",
          "vllm/model_executor/layers/fused_moe/routed_experts.py: RoutedExperts.build_expert_params_mapping",
          f"{_MM}: LoRAModelManager._create_merged_loras_inplace")),
        (v, "vllm_per_expert_other_block", SILENTLY_IGNORED, "per-expert LoRA under a block name vLLM's model does "
         "not use: the loader checks only the name after '.experts', packing looks names up under vLLM's block",
         ("vllm/lora/lora_model.py: LoRAModel.from_local_checkpoint (check_unexpected_modules)",
          f"{_MM}: LoRAModelManager._create_merged_loras_inplace",
          "vllm/model_executor/models/mixtral.py: MixtralDecoderLayer.block_sparse_moe")),
        (v, "vllm_per_expert_unknown_proj", REFUSED, "per-expert LoRA whose projection names vLLM's expert mapping "
         "does not hold (after the arch's hf_to_vllm_mapper)",
         ("vllm/lora/lora_model.py: LoRAModel.from_local_checkpoint (check_unexpected_modules)",
          "vllm/lora/worker_manager.py: WorkerLoRAManager._load_adapter (expected_lora_modules)",
          "vllm/model_executor/models/mixtral.py: MixtralModel.hf_to_vllm_mapper")),
        (v, "vllm_per_expert_on_3d", LOADS_WITH_OPTION, "3D MoE arch, per-expert LoRA: its names are unexpected "
         "unless enable_mixed_moe_lora_format forces the 2D MoE LoRA wrapper",
         ("vllm/lora/utils.py: process_packed_modules_mapping (force_2d_moe)",
          "vllm/lora/lora_model.py: LoRAModel.from_local_checkpoint (check_unexpected_modules)",
          "vllm/config/lora.py: LoRAConfig.enable_mixed_moe_lora_format")),
        (v, "vllm_fused_3d", LOADS, "3D MoE arch, fused expert LoRA in peft >= 0.19's standard layout "
         "(experts.base_layer = gate_up_proj, experts = down_proj; lora_A expert-major rows, lora_B expert-fastest "
         "columns)",
         (f"{_MM}: LoRAModelManager._stack_moe_lora_weights",
          "vllm/lora/layers/fused_moe.py: FusedMoE3DWithLoRA.set_lora",
          "vllm/model_executor/models/gpt_oss.py: GptOssForCausalLM.is_3d_moe_weight")),
        (v, "vllm_fused_2d", LOADS_WITH_OPTION, "2D MoE arch, fused standard expert LoRA: refused by default, split "
         "into per-expert tensors with enable_mixed_moe_lora_format=True and LoRARequest(is_3d_lora_weight=True)",
         (f"{_MM}: LoRAModelManager._validate_moe_lora_format",
          f"{_MM}: LoRAModelManager._convert_3d_to_2d_moe_lora",
          "vllm/lora/request.py: LoRARequest.is_3d_lora_weight",
          "vllm/config/lora.py: LoRAConfig.enable_mixed_moe_lora_format")),
        (v, "vllm_fused_other_block", SILENTLY_IGNORED, "fused expert LoRA under a block name vLLM's model does not "
         "use (mixtral: transformers 5.x 'mlp.experts', vLLM 'block_sparse_moe.experts'): the format check and the "
         "3D->2D split look it up under vLLM's name, find nothing, and every expert LoRA buffer stays zero",
         (f"{_MM}: LoRAModelManager._validate_moe_lora_format",
          f"{_MM}: LoRAModelManager._convert_3d_to_2d_moe_lora",
          "vllm/model_executor/models/mixtral.py: MixtralDecoderLayer.block_sparse_moe")),
        (v, "vllm_fused_swapped", REFUSED, "fused expert LoRA in peft 0.18's swapped layout: lora_A / lora_B do not "
         "fit the expert LoRA buffers (shape mismatch when the adapter is activated; on a 2D arch refused already "
         "by the format check unless the mixed format is on)",
         (f"{_MM}: LoRAModelManager._stack_moe_lora_weights",
          f"{_MM}: LoRAModelManager._convert_3d_to_2d_moe_lora",
          "vllm/lora/layers/fused_moe.py: FusedMoEWithLoRA.set_lora, FusedMoE3DWithLoRA.set_lora")),
        (v, "vllm_fused_incomplete", REFUSED, "fused expert LoRA on only one of gate_up_proj / down_proj: vLLM reads "
         "experts.base_layer as gate_up_proj and experts as down_proj and needs both",
         (f"{_MM}: LoRAModelManager._stack_moe_lora_weights (asserts both)",
          f"{_MM}: LoRAModelManager._validate_moe_lora_format",
          "vllm/lora/layers/fused_moe.py: FusedMoEWithLoRA.set_lora (expects per-expert lists)")),
        (v, "vllm_mixed", REFUSED, "per-expert and fused expert LoRA in one adapter: one of the two is always "
         "refused (the fused part on a 2D arch, the per-expert part on a 3D arch)",
         (f"{_MM}: LoRAModelManager._validate_moe_lora_format",
          "vllm/lora/lora_model.py: LoRAModel.from_local_checkpoint (check_unexpected_modules)")),
        (s, "sglang_no_expert_lora", LOADS, "no expert LoRA: nothing expert-specific is checked",
         (f"{_SG}/lora.py: LoRAAdapter._normalize_weights",)),
        (s, "sglang_per_expert", LOADS, "per-expert LoRA with target_modules naming gate/up and down: stacked into "
         "gate_up_proj / down_proj per expert, the FusedMoE wrapped",
         (f"{_SG}/lora.py: LoRAAdapter.normalize_gate_up_proj, LoRAAdapter._rename_expert_w_to_proj",
          f"{_SG}/utils.py: get_normalized_target_modules",
          f"{_SG}/lora_manager.py: LoRAManager.init_lora_modules",
          f"{_SG}/mem_pool.py: LoRAMemoryPool.load_lora_weight_to_buffer")),
        (s, "sglang_per_expert_w_names", REFUSED, "per-expert LoRA whose target_modules name w1/w2/w3 (transformers "
         "4.57's mixtral): SGLang keeps them as target names, has no LoRA buffer shape for them and never wraps the "
         "experts",
         (f"{_SG}/utils.py: get_normalized_target_modules, get_default_hidden_dim",
          f"{_SG}/mem_pool.py: LoRAMemoryPool.init_buffers, LoRAMemoryPool.can_support")),
        (s, "sglang_per_expert_partial", SILENTLY_IGNORED, "per-expert LoRA whose target_modules name only some of "
         "gate/up/down: the FusedMoE is wrapped only when both gate_up_proj and down_proj are targets, so the expert "
         "weights are loaded into buffers that no layer reads",
         (f"{_SG}/lora_manager.py: LoRAManager.init_lora_modules",
          f"{_SG}/mem_pool.py: LoRAMemoryPool.load_lora_weight_to_buffer (active_target_modules)")),
        (s, "sglang_fused", REFUSED, "fused expert LoRA (peft target_parameters, experts(.base_layer).lora_A/B): "
         "the key names no target module",
         (f"{_SG}/mem_pool.py: LoRAMemoryPool.load_lora_weight_to_buffer",
          f"{_SG}/utils.py: get_target_module_name",
          f"{_SG}/lora_config.py: LoRAConfig (target_parameters is not read)")),
        (s, "sglang_gpt_oss", UNSUPPORTED, "gpt_oss: fused experts only (no per-expert form) and peft's fused layout "
         "is not one SGLang reads",
         (f"{_SG}/mem_pool.py: LoRAMemoryPool.load_lora_weight_to_buffer",
          f"{_SG}/utils.py: get_target_module_name")),
        (s, "sglang_target_modules_string", REFUSED, "target_modules given as a string other than 'all' / "
         "'all-linear' (a regex), or not given",
         (f"{_SG}/lora_manager.py: LoRAManager.init_lora_shapes",
          f"{_SG}/utils.py: get_normalized_target_modules")),
        (s, "sglang_q_without_v", REFUSED, "attention LoRA on q_proj without v_proj in a layer: SGLang stacks "
         "q/k/v and takes a missing k_proj's shape from v_proj, so the v_proj key is looked up and missing "
         "(KeyError) while the adapter's weights are normalized",
         (f"{_SG}/lora.py: LoRAAdapter.normalize_qkv_proj",)),
        (s, "sglang_mixed", REFUSED, "per-expert and fused expert LoRA in one adapter: the fused part is refused",
         (f"{_SG}/mem_pool.py: LoRAMemoryPool.load_lora_weight_to_buffer",)),
    ]
    rules = {rid: Rule(rid, engine, outcome, summary, _cite(engine, *refs))
             for engine, rid, outcome, summary, refs in table}
    on = "shims.adapters.lora_layout / shims.adapters.adapter_per_expert, measured with peft on the installed lanes"
    for rid, outcome, summary in (
            ("transformers_match", LOADS, "the adapter has the expert layout this transformers + peft builds"),
            ("transformers_fused_on_per_expert_model", SILENTLY_IGNORED, "fused target_parameters on 4.57's "
             "per-expert experts: peft matches no parameter (a warning) and attaches no expert LoRA"),
            ("transformers_per_expert_on_fused_model", SILENTLY_IGNORED, "per-expert modules on 5.x's fused experts: "
             "peft attaches no expert LoRA (peft >= 0.22 warns 'Found unexpected adapter keys', 0.18 says nothing)"),
            ("transformers_layout_mismatch", REFUSED, "fused LoRA in the other peft layout: size mismatch on load"),
            ("transformers_layout_mismatch_same_shapes", SILENTLY_WRONG, "fused LoRA in the other peft layout with "
             "coinciding shapes (2I == H or I == H): loads, every expert delta wrong"),
            ("transformers_mixed", SILENTLY_IGNORED, "per-expert and fused expert LoRA in one adapter: the part this "
             "transformers does not build is dropped")):
        rules[rid] = Rule(rid, "transformers", outcome, summary, (on,))
    return rules


RULES: dict[str, Rule] = _rules()


@dataclass(frozen=True)
class AdapterCheck:
    """The verdict of :func:`check_adapter`.

    ``found`` / ``needed``: "per_expert", "standard", "swapped" (fused layouts), "none" (no expert LoRA), "mixed" /
    "mixed_layouts" (found only); ``needed`` is what the engine reads as it is, None when it reads no expert LoRA
    this tool can write for the arch. ``outcome``: what the engine does with the adapter (:data:`OUTCOMES`);
    ``options``: engine options under which it loads as it is (``{"LLM": {...}, "LoRARequest": {...}}``), or None.
    ``compatible`` is True only for outcome "loads". ``conversion``: the command that makes it load without options,
    or None. ``message``: a fragment of the engine's error (outcome "refused" / "loads_with_option" without the
    options), from its source. ``rule`` / ``cites``: the rule applied (:data:`RULES`) and the engine files it comes
    from; ``engine_version``: the release those files were read from."""

    engine: str
    model_type: str | None
    found: str
    needed: str | None
    compatible: bool
    conversion: str | None
    reason: str
    source: str = SOURCES
    outcome: str = LOADS
    options: dict | None = None
    rule: str = ""
    cites: tuple[str, ...] = ()
    engine_version: str | None = None
    message: str | None = None
    architecture: str | None = None

    @property
    def exit_code(self) -> int:
        """0: loads as it is; 1: it does not (a conversion and/or engine options are named)."""
        return 0 if self.compatible else 1

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cites"] = list(self.cites)
        return out


@dataclass(frozen=True)
class _Adapter:
    """What the rules look at in a saved adapter."""

    path: Path
    config: dict
    found: str
    blocks: frozenset        # module names holding "experts" (mlp, block_sparse_moe), per-expert or fused
    projs: frozenset         # per-expert projection names (gate_proj, w1, ...)
    fused: tuple             # shims.adapters.adapter_convert.ExpertLora per fused expert-parameter LoRA
    fused_params: tuple      # per fused experts module: the frozenset of expert parameters it has LoRA on
    tensor_names: frozenset  # every key of adapter_model.safetensors

    @property
    def layouts(self) -> frozenset:
        return frozenset(info.layout for info in self.fused)


def check_adapter(adapter_dir, engine: str, base_config=None, transformers_version: str | None = None,
                  peft_version: str | None = None) -> AdapterCheck:
    """What ``engine`` (vllm / sglang / transformers) does with this adapter's expert LoRA as it is laid out.

    ``base_config``: as for :func:`shims.convert_adapter` (default: the adapter's ``base_model_name_or_path``, a local
    folder or a hub id in the local cache); needed whenever the adapter has expert LoRA. For ``engine="transformers"``
    the versions default to the installed transformers and peft. Rules and where they come from: this module's
    docstring and :data:`RULES` (vLLM 0.34.0 and SGLang 0.5.23, read from source, the engines are not run here).
    Raises ValueError / FileNotFoundError for bad input.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    adapter_dir = Path(adapter_dir)
    adapter_config = read_json(_config_path(adapter_dir))
    tensors = read_tensors(adapter_dir)
    per_expert = [m for m in (PER_EXPERT_KEY.match(k) for k in tensors) if m]
    fused = bool(adapter_config.get("target_parameters"))
    base = None
    if per_expert or fused:
        base = load_base_config(base_config, adapter_config, required=True)
    adapter = _read_adapter(adapter_dir, adapter_config, base, per_expert, fused, frozenset(tensors))
    model_type = _model_type(base) if base is not None else None
    if engine == "vllm":
        verdict = _vllm(adapter, model_type, base)
    elif engine == "sglang":
        verdict = _sglang(adapter, model_type)
    else:
        verdict = _transformers(adapter, model_type, base, transformers_version, peft_version)
    return _finish(engine, model_type, adapter, base, **verdict)


def _config_path(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a saved peft adapter")
    return path


def _model_type(base: dict) -> str | None:
    text = base.get("text_config")
    model_type = base.get("model_type")
    # a multimodal wrapper names the MoE in its own model_type (qwen3_vl_moe); only a bare text config is read inside
    return model_type or (text.get("model_type") if isinstance(text, dict) else None)


def _architecture(base: dict | None) -> str | None:
    archs = (base or {}).get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def _read_adapter(path: Path, config: dict, base, per_expert_matches, fused: bool, names: frozenset) -> _Adapter:
    blocks = {m["moe"].rsplit(".", 1)[-1] for m in per_expert_matches}
    projs = frozenset(m["proj"] for m in per_expert_matches)
    infos, by_module = (), {}
    if per_expert_matches and fused:
        found = MIXED
    elif per_expert_matches:
        found = PER_EXPERT
    elif fused:
        infos = tuple(detect_adapter_layout(path, base).values())
        if not infos:
            raise ValueError(f"{path}: target_parameters {config.get('target_parameters')} but no fused expert LoRA "
                             "tensors (no '...experts.lora_A.weight' key)")
        for info in infos:
            module = re.sub(r"(\.base_layer)+$", "", info.prefix)
            by_module.setdefault(module, set()).add(info.param)
            blocks.add(module[: -len(".experts")].rsplit(".", 1)[-1])
        layouts = {info.layout for info in infos}
        found = layouts.pop() if len(layouts) == 1 else MIXED_LAYOUTS
    else:
        found = NO_EXPERT_LORA
    return _Adapter(path, config, found, frozenset(blocks), projs, infos,
                    tuple(frozenset(p) for p in by_module.values()), names)


def _verdict(rule: str, needed: str | None, reason: str, options: dict | None = None, message: str | None = None,
             conversion: str | None | bool = True) -> dict:
    """``conversion``: True -> the conversion from found to needed; None / a string -> as given."""
    return {"rule": rule, "needed": needed, "reason": reason, "options": options, "message": message,
            "conversion": conversion}


def _finish(engine: str, model_type, adapter: _Adapter, base, rule: str, needed, reason: str, options, message,
            conversion) -> AdapterCheck:
    spec = RULES[rule]
    if conversion is True:
        conversion = None if spec.outcome == LOADS else _conversion(adapter.path, adapter.found, needed)
    version = ENGINE_VERSIONS.get(engine)
    if version:
        files = "; ".join(cite.split(" @ ")[0] for cite in spec.cites)
        source = f"{'vLLM' if engine == 'vllm' else 'SGLang'} {version}: {files}; {NOT_RUN}"
    else:
        source = f"transformers + peft: {spec.cites[0]}"
    return AdapterCheck(engine=engine, model_type=model_type, found=adapter.found, needed=needed,
                        compatible=spec.outcome == LOADS, conversion=conversion, reason=reason, source=source,
                        outcome=spec.outcome, options=options, rule=rule, cites=spec.cites, engine_version=version,
                        message=message, architecture=_architecture(base))


# -- vLLM 0.34.0 ---------------------------------------------------------------------------------------------------
def _vllm(adapter: _Adapter, model_type, base) -> dict:
    found = adapter.found
    if found == NO_EXPERT_LORA:
        return _verdict("vllm_no_expert_lora", NO_EXPERT_LORA, "no expert LoRA in this adapter (attention / dense "
                        "modules only): nothing to convert")
    arch = _architecture(base)
    is_3d = arch in VLLM_3D_MOE_ARCHITECTURES if arch else model_type in VLLM_3D_MOE_MODEL_TYPES
    kind = (f"{arch or model_type} is a 3D MoE arch in vLLM (is_3d_moe_weight): it reads fused expert LoRA" if is_3d
            else f"{arch or model_type} is a 2D MoE arch in vLLM: it reads per-expert expert LoRA")
    needed = STANDARD if is_3d else PER_EXPERT
    block = _VLLM_MOE_BLOCK.get(model_type, "mlp")
    other_blocks = sorted(adapter.blocks - {block})
    if found == MIXED:
        return _verdict("vllm_mixed", needed, f"{kind}; the adapter has both per-expert and fused expert LoRA, and "
                        "vLLM refuses one of the two (convert the fused part alone)", conversion=None,
                        message="contains fused 3D MoE weights" if not is_3d else "expected target modules in")
    if found == PER_EXPERT:
        return _vllm_per_expert(adapter, model_type, is_3d, kind, block, other_blocks)
    return _vllm_fused(adapter, is_3d, kind, block, other_blocks)


def _vllm_per_expert(adapter: _Adapter, model_type, is_3d: bool, kind: str, block: str, other_blocks) -> dict:
    accepted = _VLLM_EXPERT_PROJS.get(model_type, _DEFAULT_EXPERT_PROJS)
    unknown = sorted(adapter.projs - accepted)
    needed = STANDARD if is_3d else PER_EXPERT
    if unknown:
        return _verdict("vllm_per_expert_unknown_proj", needed, f"{kind}; the adapter's per-expert modules "
                        f"{unknown} are not names vLLM's {model_type} experts take ({sorted(accepted)}), so the "
                        "loader refuses them; rename them", conversion=None, message="expected target modules in")
    if other_blocks:
        path = adapter.path
        two_steps = (f"python -m shims convert-adapter {path} {path}-standard --to fused --layout standard && "
                     f"python -m shims convert-adapter {path}-standard {path}-per_expert --to per_expert")
        return _verdict("vllm_per_expert_other_block", needed, f"{kind} under '{block}.experts'; the adapter's "
                        f"per-expert LoRA is under {[b + '.experts' for b in other_blocks]}: vLLM loads it without "
                        "an error or warning and applies none of it (every expert LoRA buffer stays zero); rewrite "
                        f"its module names to '{block}.experts.N' (the printed conversion does)",
                        conversion=None if is_3d else two_steps)
    if is_3d:
        return _verdict("vllm_per_expert_on_3d", STANDARD, f"{kind}; the adapter has per-expert LoRA modules, "
                        "which vLLM refuses unless started with enable_mixed_moe_lora_format=True "
                        "(--enable-mixed-moe-lora-format); or convert it to fused (its gate_up LoRA then has rank "
                        "2r: start vLLM with max_lora_rank >= 2r)", options=VLLM_MIXED_FORMAT_2D,
                        message="expected target modules in")
    return _verdict("vllm_per_expert", PER_EXPERT, f"{kind} ('{block}.experts.N' modules); the adapter has it")


def _vllm_fused(adapter: _Adapter, is_3d: bool, kind: str, block: str, other_blocks) -> dict:
    found = adapter.found
    per_expert_fix = None if is_3d else True  # 2D: the per-expert conversion; 3D: none unless said below
    if other_blocks:
        return _verdict("vllm_fused_other_block", PER_EXPERT if not is_3d else STANDARD, f"{kind} under "
                        f"'{block}.experts'; the adapter's fused expert LoRA is under "
                        f"{[b + '.experts' for b in other_blocks]}: vLLM loads it without an error or warning (with "
                        "or without enable_mixed_moe_lora_format) and applies none of it, every expert LoRA buffer "
                        "stays zero; convert it to per-expert LoRA", conversion=per_expert_fix)
    if any(params != _EXPERT_PARAMS for params in adapter.fused_params):
        has = sorted(set().union(*adapter.fused_params))
        return _verdict("vllm_fused_incomplete", PER_EXPERT if not is_3d else STANDARD, f"{kind}; the adapter's "
                        f"fused expert LoRA covers only {has} of gate_up_proj and down_proj, and vLLM needs both "
                        "(experts.base_layer = gate_up_proj, experts = down_proj)" +
                        ("; per-expert LoRA has no such constraint" if not is_3d else ""),
                        conversion=per_expert_fix, message="contains fused 3D MoE weights" if not is_3d else None)
    if SWAPPED in adapter.layouts:
        shape = "The size of tensor a"
        if is_3d:
            return _verdict("vllm_fused_swapped", STANDARD, f"{kind} in the standard layout; the adapter has "
                            f"{_describe(found)}, whose factors do not fit vLLM's expert LoRA buffers (shape "
                            "mismatch when the adapter is activated)", message=shape)
        return _verdict("vllm_fused_swapped", PER_EXPERT, f"{kind}; the adapter has {_describe(found)}: refused "
                        "by default, and with enable_mixed_moe_lora_format its factors do not fit the expert LoRA "
                        "buffers (shape mismatch when the adapter is activated)",
                        message="contains fused 3D MoE weights")
    if is_3d:
        return _verdict("vllm_fused_3d", STANDARD, f"{kind} in peft >= 0.19's standard layout; the adapter has it")
    return _verdict("vllm_fused_2d", PER_EXPERT, f"{kind}; the adapter has {_describe(found)}, which vLLM refuses "
                    "by default and reads with LLM(enable_mixed_moe_lora_format=True) "
                    "(--enable-mixed-moe-lora-format) and LoRARequest(is_3d_lora_weight=True); or convert it to "
                    "per-expert LoRA, read without options", options=VLLM_MIXED_FORMAT,
                    message="contains fused 3D MoE weights")


# -- SGLang 0.5.23 -------------------------------------------------------------------------------------------------
def _sglang_targets(target_modules) -> set | None:
    """SGLang's normalized target names of an adapter's list target_modules (leaf name, gate/up -> gate_up_proj)."""
    merged = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}
    return {merged.get(str(name).rsplit(".", 1)[-1], str(name).rsplit(".", 1)[-1]) for name in target_modules}


def _sglang(adapter: _Adapter, model_type) -> dict:
    found = adapter.found
    target_modules = adapter.config.get("target_modules")
    if not isinstance(target_modules, list) and target_modules not in ("all", "all-linear"):
        what = f"the string {target_modules!r}" if isinstance(target_modules, str) else repr(target_modules)
        return _verdict("sglang_target_modules_string", PER_EXPERT if found != NO_EXPERT_LORA else NO_EXPERT_LORA,
                        f"the adapter's target_modules is {what}; SGLang takes a list of module names (or 'all' / "
                        "'all-linear') and refuses anything else; write the matched module names as a list",
                        conversion=None, message="SGLang does not recognize target_modules"
                        if isinstance(target_modules, str) else "only supports inferring LoRA target modules")
    lonely_q = sorted(k for k in adapter.tensor_names if "q_proj" in k and k.replace("q_proj", "v_proj")
                      not in adapter.tensor_names)
    if lonely_q:
        return _verdict("sglang_q_without_v", PER_EXPERT if found != NO_EXPERT_LORA else NO_EXPERT_LORA,
                        f"the adapter has LoRA on q_proj without v_proj ({lonely_q[0]}); SGLang looks the v_proj "
                        "LoRA up to build the stacked qkv_proj LoRA and fails (KeyError); train or add v_proj LoRA",
                        conversion=None, message=lonely_q[0].replace("q_proj", "v_proj"))
    if found == NO_EXPERT_LORA:
        return _verdict("sglang_no_expert_lora", NO_EXPERT_LORA, "no expert LoRA in this adapter (attention / dense "
                        "modules only): nothing to convert")
    if model_type in FUSED_ON_V4:
        return _verdict("sglang_gpt_oss", None, f"SGLang reads expert LoRA as per-expert modules (or its own 3D "
                        f"'experts.<proj>' tensors, which these tools do not write) and {model_type} has no "
                        "per-expert modules: its fused adapter is refused and no conversion helps",
                        message="Cannot find target module name for" if found != PER_EXPERT else None)
    mixtral_note = (f" (python -m shims convert-adapter {adapter.path} {adapter.path}-per_expert --to per_expert); "
                    "SGLang then also needs target_modules to name gate_proj/up_proj/down_proj, not the w1/w3/w2 the "
                    "per-expert conversion writes for mixtral: edit adapter_config.json after converting")
    if found == MIXED:
        return _verdict("sglang_mixed", PER_EXPERT, "SGLang reads per-expert expert LoRA only; the adapter also has "
                        "fused expert LoRA, which it refuses (convert the fused part alone)", conversion=None,
                        message="Cannot find target module name for")
    if found != PER_EXPERT:
        is_mixtral = model_type == "mixtral"
        return _verdict("sglang_fused", PER_EXPERT, "SGLang reads expert LoRA as per-expert modules "
                        "('...experts.N.gate_proj/up_proj/down_proj'); the adapter has "
                        f"{_describe(found)} (peft target_parameters), whose keys name no target module: refused "
                        "when the adapter is first loaded into the LoRA memory pool; convert it to per-expert LoRA" +
                        (mixtral_note if is_mixtral else ""), conversion=None if is_mixtral else True,
                        message="Cannot find target module name for")
    if isinstance(target_modules, str):  # "all" / "all-linear": every FusedMoE is wrapped
        targets = {"gate_up_proj", "down_proj"}
    else:
        targets = _sglang_targets(target_modules)
    w_names = sorted(targets & _W_NAMES)
    if w_names:
        return _verdict("sglang_per_expert_w_names", PER_EXPERT, f"the adapter's target_modules name {w_names} "
                        "(transformers 4.57's mixtral per-expert names); SGLang has no LoRA buffer for them and "
                        "wraps the experts only for gate_up_proj + down_proj targets: refused at start "
                        "(NotImplementedError) or when loaded into a running server ('incompatible with the current "
                        "LoRA memory pool configuration'); rename those target_modules entries to "
                        "gate_proj/up_proj/down_proj (the tensor keys may keep w1/w3/w2)", conversion=None,
                        message=f"get_hidden_dim not implemented for {w_names[0]}")
    missing = sorted({"gate_up_proj", "down_proj"} - targets)
    if missing:
        return _verdict("sglang_per_expert_partial", PER_EXPERT, f"the adapter's target_modules lack {missing} "
                        "(SGLang names: gate_proj/up_proj -> gate_up_proj); SGLang wraps the experts only when both "
                        "gate_up_proj and down_proj are targets, so the per-expert LoRA loads without an error and "
                        "is never applied; start the server with --lora-target-modules all", conversion=None)
    return _verdict("sglang_per_expert", PER_EXPERT, "SGLang reads per-expert expert LoRA ('...experts.N.<proj>', "
                    "any block name); the adapter has it")


# -- transformers + peft -------------------------------------------------------------------------------------------
def _transformers(adapter: _Adapter, model_type, base, transformers_version, peft_version) -> dict:
    found = adapter.found
    if found == NO_EXPERT_LORA:
        return _verdict("transformers_match", NO_EXPERT_LORA, "no expert LoRA in this adapter (attention / dense "
                        "modules only): nothing to convert")
    needed, why = _transformers_needs(model_type, base, transformers_version, peft_version)
    if needed == found:
        return _verdict("transformers_match", needed, f"{why}; the adapter has it")
    has = f"{why}; the adapter has {_describe(found)}"
    if found == MIXED:
        return _verdict("transformers_mixed", needed, f"{has}: peft drops the part it cannot place", conversion=None)
    if needed == PER_EXPERT:
        return _verdict("transformers_fused_on_per_expert_model", needed, f"{has}: peft matches no expert parameter "
                        "(only a warning) and attaches no expert LoRA")
    if found == PER_EXPERT:
        return _verdict("transformers_per_expert_on_fused_model", needed, f"{has}: peft attaches no expert LoRA "
                        "(at most a warning about unexpected adapter keys)")
    dims = ExpertDims.from_config(base)
    wrong = [info.param for info in adapter.fused if info.layout != needed]
    if all(dims.param_shape(param)[0] == dims.param_shape(param)[1] for param in wrong):
        return _verdict("transformers_layout_mismatch_same_shapes", needed, f"{has}: the shapes coincide, so peft "
                        "loads it without an error and every expert delta is wrong")
    return _verdict("transformers_layout_mismatch", needed, f"{has}: peft refuses it with a size mismatch",
                    message="size mismatch")


def _transformers_needs(model_type, base, transformers_version, peft_version):
    transformers_version = transformers_version or _installed("transformers")
    peft_version = peft_version or _installed("peft")
    on = f"transformers {transformers_version} + peft {peft_version}"
    major = int(re.match(r"\d+", transformers_version).group())
    if major < 5 and model_type not in FUSED_ON_V4:
        return PER_EXPERT, f"{on} has per-expert expert modules"
    is_transposed = ExpertDims.from_config(base).is_transposed
    # 5.x experts modules declare is_transposed (gpt_oss); 4.57's gpt_oss does not, and peft reads the declaration
    layout = layout_from_peft_version(peft_version, is_transposed, declares_transposed=is_transposed and major >= 5)
    if layout is None:
        raise ValueError(f"peft {peft_version!r}: no known expert LoRA convention for this version")
    return layout, f"{on} reads {model_type} expert LoRA fused, in the {layout} layout"


def _installed(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError as exc:
        raise ValueError(f"{distribution} is not installed: pass its version to check against") from exc


def _conversion(adapter_dir: Path, found: str, needed: str | None) -> str | None:
    if needed is None or needed == NO_EXPERT_LORA:
        return None
    out = f"{adapter_dir}-{needed}"
    if found == PER_EXPERT:
        return f"python -m shims convert-adapter {adapter_dir} {out} --to fused --layout {needed}"
    if found == MIXED:
        return None  # part per-expert, part fused: no single conversion covers both
    return f"python -m shims convert-adapter {adapter_dir} {out} --to {needed}"


def _describe(found: str) -> str:
    return {PER_EXPERT: "per-expert LoRA modules", MIXED: "both per-expert and fused expert LoRA",
            MIXED_LAYOUTS: "fused expert LoRAs in both layouts"}.get(
        found, f"fused expert LoRA in the {found} layout")
