"""LLM.int8 row-wise weight quantization, byte-exact with bitsandbytes 0.50 ``int8_vectorwise_quant``.

* CPU tensors follow bitsandbytes' default op: ``SCB = max|w| per row`` (float32),
  ``q = round_half_even(w * (127.0 / SCB))`` in float32 (IEEE division).
* CUDA tensors follow bitsandbytes' CUDA kernel ``kInt8VectorQuant``: ``scale = __fdividef(127.0f, SCB)`` (the
  approximate division, ``div.approx.f32``), ``q = __float2int_rn(w * scale)``; a zero row gives 0 codes.
  bitsandbytes' CUDA op takes float16 only; we apply the same rule to bfloat16/float32.

Dequantization is bitsandbytes' ``int8_vectorwise_dequant``: ``q * SCB[:, None] * 7.874015718698502e-3`` in
float32, then cast to ``dtype``.
"""

from __future__ import annotations

import torch

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
        from . import int8_triton as tk

        return tk.quantize_int8_triton(w, flavor)
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
        from . import int8_triton as tk

        return tk.dequantize_int8_triton(q, scb, dtype)
    return (q * scb.view(-1, 1) * DEQUANT_CONST).to(dtype)
