"""qaas.kernels.int8 against bitsandbytes' int8_vectorwise_quant / int8_vectorwise_dequant (CPU, and CUDA when a
GPU is present)."""

from __future__ import annotations

import random

import pytest
import torch

from support.consumers import require

require("bitsandbytes")  # a missing consumer fails in CI
import bitsandbytes.functional as F  # noqa: E402

from qaas.kernels.int8 import dequantize_int8_rowwise, quantize_int8_rowwise  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # see test_bnb4.py


def _case(seed, device):
    rng = random.Random(seed)
    dtype = DTYPES[seed % 3]
    big = device == "cuda"
    rows = rng.randint(1, 300 if big else 40)
    cols = rng.choice([rng.randint(1, 300), 128, 4096 if big else 256, 20000 if big and seed % 5 == 0 else 77])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * rng.choice([1e-3, 1.0, 50.0])
    if rng.random() < 0.3:
        w[0] = 0  # zero row
    return w.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(24))
def test_int8_matches_bitsandbytes(seed, device):
    w = _case(seed, device)
    if device == "cuda" and w.dtype != torch.float16:
        pytest.skip("bitsandbytes' CUDA int8 quantization takes float16 only")
    ref_q, ref_s, _ = F.int8_vectorwise_quant(w.clone())
    backends = ("torch", "triton") if device == "cpu" else ("triton",)
    for backend in backends:
        q, s = quantize_int8_rowwise(w, backend=backend)
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape
        assert torch.equal(s, ref_s), backend
        assert torch.equal(q, ref_q), f"{backend}: {(q != ref_q).sum().item()} codes differ"
        for dtype in DTYPES:
            want = F.int8_vectorwise_dequant(ref_q, ref_s).to(dtype)
            for dbackend in ("torch", "triton"):
                got = dequantize_int8_rowwise(q, s, dtype, backend=dbackend)
                assert got.dtype == dtype and torch.equal(got, want), (dbackend, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_int8_torch_reference_on_cuda_is_close():
    w = torch.randn(256, 4096, device="cuda", dtype=torch.float16)
    ref_q, ref_s, _ = F.int8_vectorwise_quant(w)
    q, s = quantize_int8_rowwise(w, backend="torch")
    assert torch.equal(s, ref_s)
    assert (q.int() - ref_q.int()).abs().max() <= 1 and (q != ref_q).float().mean() < 1e-4


def test_int8_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_rowwise(torch.randn(4))
    with pytest.raises(ValueError, match="contiguous"):
        quantize_int8_rowwise(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="float16"):
        quantize_int8_rowwise(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="int8"):
        dequantize_int8_rowwise(torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2))
