"""Stacks over bitsandbytes' 32-bit element count are decoded in parts (shims.quant.storage.dequantize_flat).

A real > 2**31-element stack needs ~20 GiB here, so the limit is lowered: the same code path then runs on small
tensors, and its result must equal the single bitsandbytes call bit for bit (nested statistics, storage dtypes,
parts that end mid-block and mid-tensor). cases/bench_huge.py runs the real size on a GPU.
"""

import pytest

torch = pytest.importorskip("torch")
F = pytest.importorskip("bitsandbytes.functional")

from shims.quant import storage  # noqa: E402


@pytest.fixture
def counted_calls(monkeypatch):
    calls = []
    real = F.dequantize_4bit

    def spy(A, quant_state=None, *args, **kwargs):
        calls.append(int(torch.Size(quant_state.shape).numel()))
        return real(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(F, "dequantize_4bit", spy)
    return calls


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("limit", [64 * 7, 1000, 64 * 48 * 5 - 1])
def test_parts_equal_one_call(monkeypatch, counted_calls, nested, quant_storage, limit):
    torch.manual_seed(0)
    w = torch.randn(6, 64, 48) * 0.3
    packed, state = storage.quantize_experts_chunked(w, torch.float32, compress_statistics=nested,
                                                     quant_storage=quant_storage)
    whole = storage.dequantize_flat(packed, state)
    assert counted_calls == [w.numel()]
    monkeypatch.setattr(storage, "KERNEL_MAX_ELEMENTS", limit)
    parts = storage.dequantize_flat(packed, state)
    assert len(counted_calls) > 2 and max(counted_calls[1:]) <= limit
    assert sum(counted_calls[1:]) == w.numel()
    assert parts.shape == whole.shape and parts.dtype == whole.dtype
    assert torch.equal(parts, whole)


def test_parametrized_expert_reads_through_parts(monkeypatch, counted_calls):
    """The path every forward, merge and export takes (the parametrization) uses the split too."""
    torch.manual_seed(1)
    module = torch.nn.Module()
    module.gate_up_proj = torch.nn.Parameter(torch.randn(4, 128, 64) * 0.2)
    settings = storage.QuantSettings("nf4", False, torch.float32, torch.uint8, None)
    storage.quantize_expert_param(module, "gate_up_proj", settings)
    want = module.gate_up_proj
    monkeypatch.setattr(storage, "KERNEL_MAX_ELEMENTS", 128 * 64)
    counted_calls.clear()
    got = module.gate_up_proj
    assert counted_calls == [128 * 64] * 4
    assert torch.equal(got, want)
