"""qaas.kernels.fp8 against compressed-tensors' own scale and quantize functions (its torch path): the bytes
llm-compressor writes for FP8 weights rounded to nearest, per tensor, per channel and in 128 x 128 blocks.
The Triton kernels run in the interpreter on the CPU."""

from __future__ import annotations

import random

import pytest
import torch

from support.consumers import require

require("compressed_tensors")  # a missing consumer fails in CI
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

from qaas.kernels.fp8 import dequantize_fp8, quantize_fp8, tile_scales  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STRATEGIES = {"tensor": None, "channel": "row", "block": (128, 128)}


def _weight(seed: int) -> tuple[torch.Tensor, str]:
    rng = random.Random(seed)
    dtype = DTYPES[seed % 3]
    strategy = list(STRATEGIES)[(seed // 3) % 3]
    rows = rng.choice([1, 7, 128, 256, 130]) if strategy == "block" else rng.randint(1, 70)
    cols = rng.choice([128, 256, 200]) if strategy == "block" else rng.randint(1, 300)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * rng.choice([1e-4, 0.02, 1.0, 300.0])
    if rng.random() < 0.4:
        w[0] = 0  # a zero row: the eps scale
    if rng.random() < 0.3:
        w[-1, :3] = torch.tensor([1e-9, -3e-8, 5e-7])[: w.shape[1]]  # subnormal e4m3 codes
    return w.to(dtype), strategy


def _tile(strategy: str, w: torch.Tensor):
    t = STRATEGIES[strategy]
    return (1, w.shape[1]) if t == "row" else t


def _oracle(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor, QuantizationArgs]:
    """Scale and codes as llm-compressor gets them: min/max per tile, calculate_qparams, quantize."""
    kwargs = {"block_structure": [128, 128]} if strategy == "block" else {}
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False, **kwargs)
    if strategy == "tensor":
        lo, hi = torch.aminmax(w)
    elif strategy == "channel":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        R, C = w.shape
        nr, nc = -(-R // 128), -(-C // 128)
        p = torch.zeros(nr * 128, nc * 128, dtype=w.dtype)
        p[:R, :C] = w
        blocks = p.view(nr, 128, nc, 128)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    if strategy == "block":
        from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

        q = quantize(maybe_pad_tensor_for_block_quant(w, (128, 128)), scale, zp, args,
                     dtype=torch.float8_e4m3fn)[: w.shape[0], : w.shape[1]]
    else:
        q = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    return scale, q, args


@pytest.mark.parametrize("seed", range(18))
def test_fp8_bytes_equal_compressed_tensors(seed):
    w, strategy = _weight(seed)
    want_scale, want_q, args = _oracle(w, strategy)
    tile = _tile(strategy, w)
    scale = tile_scales(w, tile)
    assert scale.dtype == w.dtype
    assert torch.equal(scale.reshape(want_scale.shape), want_scale)
    for backend in ("torch", "triton"):
        q = quantize_fp8(w, scale, tile, backend=backend)
        assert q.dtype == torch.float8_e4m3fn
        differ = (q.view(torch.uint8) != want_q.view(torch.uint8)).sum().item()
        assert differ == 0, f"{backend}: {differ} codes differ ({strategy}, {w.dtype})"
    want_w = dequantize(want_q, want_scale, None, args) if strategy != "block" else None
    for backend in ("torch", "triton"):
        got = dequantize_fp8(q, scale, tile, w.dtype, backend=backend)
        if want_w is not None:
            assert torch.equal(got, want_w.to(w.dtype)), backend
        else:  # block: the same product, tile by tile
            ref = dequantize_fp8(q, scale, tile, w.dtype, backend="torch")
            assert torch.equal(got, ref)


def test_every_e4m3_value_round_trips():
    """All 254 finite bytes: dequantize(quantize(v)) is v, both backends."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[((codes & 0x7F) != 0x7F) & (codes != 0x80)]  # NaNs; -0 is written as +0 (see fp8_reference)
    v = codes.view(torch.float8_e4m3fn).float().reshape(1, -1)
    one = torch.ones(1, 1)
    for backend in ("torch", "triton"):
        q = quantize_fp8(v.contiguous(), one, None, backend=backend)
        assert torch.equal(q.view(torch.uint8).flatten(), codes), backend
        assert torch.equal(dequantize_fp8(q, one, None, backend=backend), v)


def test_validation():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="2-D"):
        tile_scales(torch.randn(3), None)
    with pytest.raises(ValueError, match="contiguous"):
        quantize_fp8(w.t(), torch.ones(1, 1), None)
    with pytest.raises(ValueError, match="scale must be"):
        quantize_fp8(w, torch.ones(4, 2), (1, 6))
    with pytest.raises(ValueError, match="float8"):
        dequantize_fp8(w, torch.ones(1, 1), None)
