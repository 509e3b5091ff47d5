"""LLM.int8 row-wise weight quantization, byte-exact with bitsandbytes 0.50 ``int8_vectorwise_quant``.

* CPU tensors follow bitsandbytes' default op: ``SCB = max|w| per row`` (float32),
  ``q = round_half_even(w * (127.0 / SCB))`` in float32, where torch computes ``127.0 / SCB`` as
  ``reciprocal(SCB) * 127``.
* CUDA tensors follow bitsandbytes' CUDA kernel ``kInt8VectorQuant``: ``scale = __fdividef(127.0f, SCB)`` (the
  approximate division, ``div.approx.f32``), ``q = __float2int_rn(w * scale)``; a zero row gives 0 codes.
  bitsandbytes' CUDA op takes float16 only; we apply the same rule to bfloat16/float32.

Dequantization is bitsandbytes' ``int8_vectorwise_dequant``: ``q * SCB[:, None] * 7.874015718698502e-3`` in
float32, then cast to ``dtype``.

This module is the launcher: it checks the arguments, then runs the Triton kernels of ``int8_triton.py`` (grid
chosen here) or the torch references of ``int8_reference.py``, by the rule of ``qaas.kernels.dispatch.use_triton``.
"""

from __future__ import annotations

import torch
import triton

from . import int8_reference as R
from . import int8_triton as T
from .dispatch import use_triton

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def quantize_int8_rowwise(w: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [out, in] and SCB float32 [out]; equal to bitsandbytes.functional.int8_vectorwise_quant(w)[:2]."""
    _validate(w)
    flavor = "cuda" if w.is_cuda else "cpu"
    if use_triton(backend, w):
        return _quantize_int8_triton(w, flavor)
    return R.quantize_int8_reference(w, flavor)


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
    if use_triton(backend, q):
        return _dequantize_int8_triton(q, scb, dtype)
    return R.dequantize_int8_reference(q, scb, dtype)


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
    T.int8_quant_kernel[(rows,)](w, q, scb, cols, BLOCK=block, ONE_TILE=one, FLAVOR=0 if flavor == "cuda" else 1,
                                num_warps=nw, enable_fp_fusion=False)  # fmt: skip
    return q, scb


def _dequantize_int8_triton(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    block = 4096
    T.int8_dequant_kernel[(triton.cdiv(n, block),)](q, scb, out, n, q.shape[1], BLOCK=block, num_warps=8,
                                                    enable_fp_fusion=False)  # fmt: skip
    return out
