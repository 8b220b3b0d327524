"""save_merged: exact merged export (KL vs the trained PeftModel), on-disk format, atomicity, fault injection."""

from __future__ import annotations

import copy
import re
import errno
import json

import pytest

pytestmark = pytest.mark.needs_ml

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from shims.merging import export  # noqa: E402

# fp32 exactness: logits of these tiny models are O(10), where one fp32 ulp is ~1e-6; a merge that is exact up to the
# order of float sums stays within a few ulps, a dropped or misplaced delta moves them by O(0.1..1) (asserted per arch)
FP32_MAX_ABS = 1e-4
ARCHS = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen3_5_moe_text"]
_FUSED = int(transformers.__version__.split(".")[0]) >= 5


def _peft_model(tiny_moe, lora_targets, model_type, dtype=torch.bfloat16, seed=0):
    base = tiny_moe(model_type, dtype=dtype, seed=seed)
    modules, params = lora_targets(model_type)
    if model_type == "gpt_oss" and not _FUSED:
        modules, params = modules[:2], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    extra = {"target_parameters": params} if params else {}
    torch.manual_seed(seed + 1)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=modules, init_lora_weights=False, **extra)
    model = peft.get_peft_model(base, cfg).eval()
    # Random non-zero factors at a fine-tuning-like size (delta ~10% of W) so that the bf16 rounding of the
    # merged weights, which any bf16 export has, stays below the KL target; exactness is checked in fp32.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    return model


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _kl(p_logits, q_logits) -> float:
    p = torch.log_softmax(p_logits.float(), -1)
    q = torch.log_softmax(q_logits.float(), -1)
    return torch.sum(p.exp() * (p - q), -1).mean().item()


def _reload(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _reference_logits(model, ids):
    ref = copy.deepcopy(model).float()  # fp32 compute on the bf16 base
    with torch.no_grad():
        return ref(ids).logits, ref


def _base_logits(ref, ids):
    with ref.disable_adapter():
        return ref(ids).logits


def _saved_tensors(path):
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ARCHS)
def test_export_matches_trained_model(tmp_path, tiny_moe, lora_targets, model_type):
    model = _peft_model(tiny_moe, lora_targets, model_type)
    before = _snapshot(model)
    ids = _ids()
    want, ref = _reference_logits(model, ids)
    counts = export.save_merged(model, tmp_path / "out", tokenizer=False)
    after = _snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    n_wrappers = sum(1 for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert counts["applied"] == counts["attempted"] == n_wrappers
    assert counts["experts"] > 0 and counts["attention"] > 0
    # the merge itself is exact: the same export in float32 matches the PeftModel's own fp32 logits to fp32 rounding
    export.save_merged(model, tmp_path / "out32", dtype=torch.float32, tokenizer=False)
    reloaded32 = _reload(tmp_path / "out32")
    with torch.no_grad():
        got32 = reloaded32(ids).logits
        base_logits = _base_logits(ref, ids)
    d32 = (want - got32).abs().max().item()
    print(f"{model_type}: fp32 export KL={_kl(want, got32):.3e} max|d logits|={d32:.3e}")
    assert d32 < FP32_MAX_ABS and abs(_kl(want, got32)) < 1e-6  # KL of equal models: float noise only
    # the check above can see a dropped LoRA: the base alone is further from the trained model than the bound allows
    assert (want - base_logits).abs().max().item() > FP32_MAX_ABS
    # the 16-bit export is exactly the float32 one rounded to its dtype, tensor by tensor (bf16 rounding of W + delta
    # is all that separates it from the trained model; how much that costs depends on the CPU and the seed: not gated)
    exact, rounded = _saved_tensors(tmp_path / "out32"), _saved_tensors(tmp_path / "out")
    assert exact.keys() == rounded.keys()
    assert all(torch.equal(rounded[k], exact[k].to(rounded[k].dtype)) for k in exact)
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ref.generate(input_ids=ids[:1], **gen_kw),
                           reloaded32.generate(input_ids=ids[:1], **gen_kw))

    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert "quantization_config" not in cfg
    keys = _saved_keys(tmp_path / "out")
    if model_type == "gpt_oss":
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    else:
        assert not any(k.endswith("experts.gate_up_proj") for k in keys)  # per-expert on disk, like upstream
        per_expert = "w1" if model_type == "mixtral" else "gate_proj"
        assert any(re.search(rf"experts\.3\.{per_expert}\.weight$", k) for k in keys)
    assert not any("lora_" in k or "base_layer" in k for k in keys)





def _saved_keys(path):
    from safetensors import safe_open

    keys = []
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.extend(fh.keys())
    return keys


@pytest.mark.slow
def test_wrong_merge_with_contiguous_b_slicing_is_caught(tmp_path, tiny_moe, lora_targets, monkeypatch):
    if not _FUSED:
        pytest.skip("per-expert Linear LoRA on transformers 4.x has no B slicing to get wrong")
    model = _peft_model(tiny_moe, lora_targets, "qwen3_moe")
    ids = _ids()
    want, _ = _reference_logits(model, ids)
    from peft.tuners.lora.layer import ParamWrapper

    def contiguous_b(self, adapter, *a, **k):
        A, B, E = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.num_experts
        r = A.shape[0] // E
        per = [B[:, e * r:(e + 1) * r] @ A[e * r:(e + 1) * r] for e in range(E)]
        flag = getattr(self, "_did_swap_in_out_features", False)
        return torch.stack([p if flag else p.T for p in per]) * self.scaling[adapter]

    monkeypatch.setattr(ParamWrapper, "get_delta_weight", contiguous_b)
    export.save_merged(model, tmp_path / "wrong", dtype=torch.float32, tokenizer=False)
    with torch.no_grad():
        d = (want - _reload(tmp_path / "wrong")(ids).logits).abs().max().item()
    assert d > FP32_MAX_ABS, d  # the fp32 check in test_export_matches_trained_model would fail


def _small_export_model(tiny_moe, lora_targets):
    return _peft_model(tiny_moe, lora_targets, "qwen3_moe")


def _leftovers(parent, keep):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.mark.parametrize("failure", ["exception", "enospc"])
def test_failure_after_first_shard_leaves_nothing(tmp_path, tiny_moe, lora_targets, monkeypatch, failure):
    model = _small_export_model(tiny_moe, lora_targets)
    import safetensors.torch as st

    real, calls = st.save_file, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("injected")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", failing)
    with pytest.raises(OSError if failure == "enospc" else RuntimeError):
        export.save_merged(model, tmp_path / "out", max_shard_size="100KB", tokenizer=False)
    assert len(calls) == 2
    assert _leftovers(tmp_path, keep=set()) == []

    # with an existing destination and overwrite=True the previous content survives
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError if failure == "enospc" else RuntimeError):
        export.save_merged(model, tmp_path / "out", max_shard_size="100KB", overwrite=True, tokenizer=False)
    assert (tmp_path / "out/keep.txt").read_text() == "old"
    assert _leftovers(tmp_path, keep={"out"}) == []


def test_existing_destination_and_overwrite(tmp_path, tiny_moe, lora_targets):
    model = _small_export_model(tiny_moe, lora_targets)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        export.save_merged(model, tmp_path / "out", tokenizer=False)
    assert (tmp_path / "out/keep.txt").read_text() == "old"
    counts = export.save_merged(model, tmp_path / "out", overwrite=True, max_shard_size="100KB", tokenizer=False)
    assert counts["shards"] > 1
    assert not (tmp_path / "out/keep.txt").exists()
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "out").glob("model-*.safetensors")}
    assert _leftovers(tmp_path, keep={"out"}) == []


def test_undeliverable_delta_raises_and_writes_nothing(tmp_path, tiny_moe, lora_targets, monkeypatch):
    model = _small_export_model(tiny_moe, lora_targets)
    from peft.tuners.lora import layer

    def bad(self, adapter, *a, **k):
        return torch.zeros(3, 3)

    monkeypatch.setattr(layer.Linear, "get_delta_weight", bad)
    with pytest.raises(export.MergeError, match="does not fit"):
        export.save_merged(model, tmp_path / "out", max_shard_size="100KB", tokenizer=False)
    assert _leftovers(tmp_path, keep=set()) == []


@pytest.mark.slow
def test_export_from_4bit_per_expert_linear4bit(tmp_path, tiny_moe, lora_targets):
    """transformers 4.57: experts are nn.Linear -> bitsandbytes Linear4bit; export dequantizes them."""
    if _FUSED:
        pytest.skip("fused 3D experts on 5.x are quantized by shims.quant.loader_v5 (tested with that shim)")
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    base = tiny_moe("qwen3_moe", dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    qbase = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    modules, _ = lora_targets("qwen3_moe")
    torch.manual_seed(1)
    model = peft.get_peft_model(qbase, peft.LoraConfig(r=3, lora_alpha=5, target_modules=modules,
                                                       init_lora_weights=False)).eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    counts = export.save_merged(model, tmp_path / "out", dtype=torch.float32, tokenizer=False)
    assert counts["applied"] == counts["attempted"] > 0
    with torch.no_grad():
        got = _reload(tmp_path / "out")(ids).logits
    d = (want - got).abs().max().item()
    print(f"4.57 Linear4bit: KL={_kl(want, got):.3e} max|d logits|={d:.3e}")
    assert d < FP32_MAX_ABS  # dequantized W + delta in float32 is what the live fp32-compute model computes
    assert "quantization_config" not in json.loads((tmp_path / "out/config.json").read_text())


def test_bf16_export_keeps_the_models_float32_tensors(tmp_path, tiny_moe, lora_targets):
    """A tensor the model class keeps in float32 in a 16-bit model (transformers' _keep_in_fp32_modules_strict,
    e.g. glm4_moe's router ``gate.weight`` on 5.x) is exported in float32, as the model holds and trains it;
    everything else in the requested dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    import shims

    model = tiny_moe("glm4_moe")
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not keep:
        pytest.skip("this transformers keeps no glm4_moe tensor in float32")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    shims.save_merged(pm, tmp_path / "out", dtype=torch.bfloat16, tokenizer=False)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    kept = {k: v for k, v in saved.items() if any(k.endswith(f".{n}") or f".{n}." in k for n in keep)}
    assert kept and all(v.dtype == torch.float32 for v in kept.values()), {k: v.dtype for k, v in kept.items()}
    router = "model.layers.0.mlp.gate.weight"
    if router in kept:
        assert torch.equal(kept[router], model.model.layers[0].mlp.gate.weight.detach().float())
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


# ---- the tokenizer: an export a serving engine can load as it is -------------------------------------------------
def _char_tokenizer():
    from cases.tiny import build_tokenizer

    return build_tokenizer()


def _tokenizer_files(path):
    return sorted(p.name for p in path.iterdir() if p.name in export._TOKENIZER_FILES)


def _encodes_like(path, want, text="ab ba"):
    got = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return got(text)["input_ids"] == want(text)["input_ids"]


def _hub_cache(tmp_path, monkeypatch, repo_id, tokenizer=None, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache under tmp_path, laid out as huggingface_hub writes it (blobs, snapshots/<rev> symlinks,
    refs/main), used by this process as its cache; holding ``tokenizer``'s files for ``repo_id`` when given."""
    import huggingface_hub

    cache = tmp_path / "hf_home" / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    if tokenizer is not None:
        staged = tmp_path / "tokenizer_staged"
        tokenizer.save_pretrained(staged)
        (repo / "blobs").mkdir()
        for f in staged.iterdir():
            blob = repo / "blobs" / f"blob-{f.name}"
            f.rename(blob)
            (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the variables once, at import: its module constant is what a fresh process would hold
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_tokenizer_copied_from_the_base_folder(tmp_path, tiny_moe, lora_targets):
    tok = _char_tokenizer()
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    modules, params = lora_targets("qwen3_moe")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=modules, target_parameters=params))
    export.save_merged(model, tmp_path / "out", dtype=torch.float32)
    copied = _tokenizer_files(tmp_path / "out")
    assert "tokenizer.json" in copied and copied == _tokenizer_files(tmp_path / "base")
    for name in copied:  # the base's own files, byte for byte
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "base" / name).read_bytes(), name
    assert _encodes_like(tmp_path / "out", tok)


def test_tokenizer_from_a_hub_id_in_the_local_cache(tmp_path, monkeypatch, tiny_moe, lora_targets):
    tok = _char_tokenizer()
    _hub_cache(tmp_path, monkeypatch, "org/tiny-moe", tokenizer=tok)
    model = _small_export_model(tiny_moe, lora_targets)
    model.get_base_model().config._name_or_path = "org/tiny-moe"  # what from_pretrained("org/tiny-moe") records
    export.save_merged(model, tmp_path / "out", dtype=torch.float32)
    written = _tokenizer_files(tmp_path / "out")
    assert "tokenizer.json" in written
    assert not any((tmp_path / "out" / n).is_symlink() for n in written)  # contents, not links into the cache
    assert _encodes_like(tmp_path / "out", tok)


@pytest.mark.parametrize("source", ["from_config", "folder_without_tokenizer", "hub_id_not_cached", "not_a_repo_id"])
def test_no_tokenizer_found_raises_before_writing(tmp_path, monkeypatch, tiny_moe, lora_targets, source):
    _hub_cache(tmp_path, monkeypatch, "org/other")  # an empty cache: nothing of the user's is looked at
    model = _small_export_model(tiny_moe, lora_targets)
    config = model.get_base_model().config
    named = {"from_config": "", "hub_id_not_cached": "org/absent-model", "not_a_repo_id": str(tmp_path / "gone"),
             "folder_without_tokenizer": str(tmp_path / "base")}[source]
    if source == "folder_without_tokenizer":
        (tmp_path / "base").mkdir()
        config.save_pretrained(tmp_path / "base")
        (tmp_path / "base" / "tokenizer_config.json").write_text("{}")  # not a tokenizer on its own
    config._name_or_path = named
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(export.MissingTokenizerError, match="tokenizer=False") as err:
        export.save_merged(model, tmp_path / "out", dtype=torch.float32)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "tokenizer=<" in message and "Nothing was written" in message
    assert (named in message) if named else ("_name_or_path" in message)
    if source == "folder_without_tokenizer":
        assert "tokenizer.json" in message and "only tokenizer_config.json" in message
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left either


def test_tokenizer_false_writes_none(tmp_path, tiny_moe, lora_targets):
    model = _small_export_model(tiny_moe, lora_targets)
    model.get_base_model().config._name_or_path = ""  # nothing to find: no error either
    counts = export.save_merged(model, tmp_path / "out", dtype=torch.float32, tokenizer=False)
    assert counts["applied"] > 0
    assert _tokenizer_files(tmp_path / "out") == []
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()


def test_tokenizer_object_is_saved_and_a_non_tokenizer_refused(tmp_path, tiny_moe, lora_targets):
    tok = _char_tokenizer()
    model = _small_export_model(tiny_moe, lora_targets)
    export.save_merged(model, tmp_path / "out", dtype=torch.float32, tokenizer=tok)
    assert "tokenizer.json" in _tokenizer_files(tmp_path / "out") and _encodes_like(tmp_path / "out", tok)
    for wrong in (True, "org/tiny-moe"):
        with pytest.raises(TypeError, match="save_pretrained"):
            export.save_merged(model, tmp_path / "wrong", dtype=torch.float32, tokenizer=wrong)
        assert not (tmp_path / "wrong").exists()
