"""save_merged merges expert stacks a few experts at a time (bounded device memory at Qwen3-30B-A3B scale): with
the chunk lowered so that every stack is split (and a last chunk of one expert is folded into the one before), the
export is bit-identical to the one-piece merge (in both peft expert layouts: the 5.5 + peft 0.18 test lane runs it too)."""

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from shims.merging import export  # noqa: E402

from conftest import lx_fused_experts  # noqa: E402


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_chunked_merge_is_the_whole_merge(tiny_moe, lora_targets, model_type, tmp_path, monkeypatch):
    if not lx_fused_experts():
        pytest.skip("transformers 4.x: per-expert Linear experts, nothing to chunk")
    base = tiny_moe(model_type, dtype=torch.bfloat16, num_local_experts=5, num_experts=5)
    expert = base.model.layers[0].mlp.experts
    per_expert = min(getattr(expert, n)[0].numel() for n in ("gate_up_proj", "down_proj"))
    modules, params = lora_targets(model_type)
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=5, target_modules=modules,
                                                      target_parameters=params, init_lora_weights=False)).eval()
    export.save_merged(model, tmp_path / "whole", dtype=torch.float32, tokenizer=False)
    calls = []
    real = export._float32_delta
    monkeypatch.setattr(export, "_float32_delta", lambda w, a, experts=None: calls.append(experts) or real(w, a, experts))
    monkeypatch.setattr(export, "MERGE_CHUNK_ELEMENTS", 2 * per_expert)  # 5 experts -> chunks of 2, 3
    export.save_merged(model, tmp_path / "chunked", dtype=torch.float32, tokenizer=False)
    ranges = [c for c in calls if c is not None]
    assert (0, 2) in ranges and (2, 5) in ranges and all(stop - start >= 2 for start, stop in ranges)
    whole, chunked = _tensors(tmp_path / "whole"), _tensors(tmp_path / "chunked")
    assert sorted(whole) == sorted(chunked)
    assert [k for k in whole if not torch.equal(whole[k], chunked[k])] == []
