"""Plain-torch references of the LLM.int8 kernels (`qaas.kernels.int8`): what the Triton kernels are tested
against, and what runs for tensors off CUDA."""

from __future__ import annotations

import torch

DEQUANT_CONST = 7.874015718698502e-3


def quantize_int8_reference(w: torch.Tensor, flavor: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def dequantize_int8_reference(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q * scb.view(-1, 1) * DEQUANT_CONST).to(dtype)
