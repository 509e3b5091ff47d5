"""LLM.int8 row-wise weight quantization, byte-exact with bitsandbytes 0.50 ``int8_vectorwise_quant``.

* CPU tensors follow bitsandbytes' default op: ``SCB = max|w| per row`` (float32),
  ``q = round_half_even(w * (127.0 / SCB))`` in float32, where torch computes ``127.0 / SCB`` as
  ``reciprocal(SCB) * 127``.
* CUDA tensors follow bitsandbytes' CUDA kernel ``kInt8VectorQuant``: ``scale = __fdividef(127.0f, SCB)`` (the
  approximate division, ``div.approx.f32``), ``q = __float2int_rn(w * scale)``; a zero row gives 0 codes.
  bitsandbytes' CUDA op takes float16 only; we apply the same rule to bfloat16/float32.

Dequantization is bitsandbytes' ``int8_vectorwise_dequant``: ``q * SCB[:, None] * 7.874015718698502e-3`` in
float32, then cast to ``dtype``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import round_to_bf16

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEQUANT_CONST = 7.874015718698502e-3


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"


def _validate(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError("w must be a torch.Tensor")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_int8_rowwise supports float16, bfloat16 and float32, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous (call .contiguous() first)")
    if w.numel() == 0:
        raise ValueError("w must have at least one element")


def _quantize_int8_ref(w: torch.Tensor, flavor: str) -> tuple[torch.Tensor, torch.Tensor]:
    scb = w.abs().amax(dim=1).float()
    if flavor == "cpu":
        # bitsandbytes/backends/default/ops.py int8_vectorwise_quant (threshold=0)
        scale = 127.0 / scb.unsqueeze(-1)
    else:
        # __fdividef(127, x): 127 * rcp.approx(x) is what div.approx.f32 computes; torch has no such op, so the
        # reference uses the IEEE quotient (can differ in the last bit of `scale`; the Triton kernel is exact).
        scale = 127.0 / scb.unsqueeze(-1)
    q = torch.round(w * scale)
    q = torch.nan_to_num(q, nan=0.0)  # zero row: 0 * inf -> NaN -> 0
    return q.to(torch.int8), scb


def quantize_int8_rowwise(w: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [out, in] and SCB float32 [out]; equal to bitsandbytes.functional.int8_vectorwise_quant(w)[:2]."""
    _validate(w)
    flavor = "cuda" if w.is_cuda else "cpu"
    if _use_triton(w, backend):
        return _quantize_int8_triton(w, flavor)
    return _quantize_int8_ref(w, flavor)


def dequantize_int8_rowwise(
    q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float16, *, backend: str = "auto"
) -> torch.Tensor:
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    if q.dim() != 2 or scb.dim() != 1 or scb.numel() != q.shape[0]:
        raise ValueError(f"q must be [out, in] and scb [out]; got {tuple(q.shape)} and {tuple(scb.shape)}")
    if scb.dtype != torch.float32:
        raise ValueError(f"scb must be float32, got {scb.dtype}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if not q.is_contiguous() or not scb.is_contiguous():
        raise ValueError("q and scb must be contiguous")
    if _use_triton(q, backend):
        return _dequantize_int8_triton(q, scb, dtype)
    return (q * scb.view(-1, 1) * DEQUANT_CONST).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _fdividef(a, b):
    # CUDA's __fdividef(a, b) is PTX div.approx.f32.
    return tl.inline_asm_elementwise(
        "div.approx.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _rint(v):
    # round half to even for |v| < 2**22 (exact with IEEE float32 adds; fused adds are disabled at launch)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _int8_quant_kernel(w_ptr, q_ptr, scb_ptr, cols, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                       FLAVOR: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    r = tl.arange(0, BLOCK)
    if ONE_TILE:
        m = r < cols
        w = tl.load(w_ptr + base + r, mask=m, other=0.0).to(tl.float32)
        am = tl.max(tl.abs(w), axis=0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, cols, BLOCK):
            m = start + r < cols
            acc = tl.maximum(acc, tl.abs(tl.load(w_ptr + base + start + r, mask=m, other=0.0).to(tl.float32)))
        am = tl.max(acc, axis=0)
    tl.store(scb_ptr + row, am)
    if FLAVOR == 0:
        scale = _fdividef(tl.full([BLOCK], 127.0, tl.float32), tl.full([BLOCK], 1.0, tl.float32) * am)
    else:
        # torch evaluates `127.0 / t` as reciprocal(t) * 127 (Tensor.__rtruediv__), so does bitsandbytes' CPU op
        scale = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), tl.full([BLOCK], 1.0, tl.float32) * am) * 127.0
    if ONE_TILE:
        qv = _rint(w * scale)
        qv = tl.where(am == 0.0, 0.0, qv)
        tl.store(q_ptr + base + r, qv.to(tl.int8), mask=m)
    else:
        for start in range(0, cols, BLOCK):
            m = start + r < cols
            w = tl.load(w_ptr + base + start + r, mask=m, other=0.0).to(tl.float32)
            qv = _rint(w * scale)
            qv = tl.where(am == 0.0, 0.0, qv)
            tl.store(q_ptr + base + start + r, qv.to(tl.int8), mask=m)


@triton.jit
def _int8_dequant_kernel(q_ptr, scb_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=0).to(tl.float32)
    s = tl.load(scb_ptr + offs // cols, mask=m, other=0.0)
    v = (q * s) * 7.874015718698502e-3
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = round_to_bf16(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


def _quantize_int8_triton(w: torch.Tensor, flavor: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    if flavor == "cuda" and not w.is_cuda:
        raise ValueError("the CUDA rule (__fdividef) needs a CUDA tensor")
    q = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scb = torch.empty(rows, dtype=torch.float32, device=w.device)
    p2 = triton.next_power_of_2(cols)
    one = p2 <= 16384
    block = p2 if one else 4096
    nw = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _int8_quant_kernel[(rows,)](w, q, scb, cols, BLOCK=block, ONE_TILE=one, FLAVOR=0 if flavor == "cuda" else 1,
                                num_warps=nw, enable_fp_fusion=False)  # fmt: skip
    return q, scb


def _dequantize_int8_triton(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    block = 4096
    _int8_dequant_kernel[(triton.cdiv(n, block),)](q, scb, out, n, q.shape[1], BLOCK=block, num_warps=8,
                                                    enable_fp_fusion=False)  # fmt: skip
    return out
