"""RMSNorm as Llama's `LlamaRMSNorm.forward` computes it, in one pass over memory.

HF's module runs six kernels per call (to float32, square, mean, multiply by the rsqrt, back to the input's
dtype, times the weight) through float32 temporaries: ~36 bytes of memory traffic per element where one read
and one write are 4 (half precision). On a GPTQ job's calibration passes (262k tokens x 4096 at 8B, eight calls
per block) that is ~80 ms per block. The kernel computes the same expression in the same order and precision
(float32 statistics, rounding to the input's dtype before the weight, as HF does); only the order of the sum of
squares differs, so results agree with HF's to a unit in the last place of the output dtype.

The launcher runs the Triton kernel of ``rms_norm_triton.py`` or the torch reference (HF's expression), by the
rule of ``qaas.kernels.dispatch.use_triton``.
"""

from __future__ import annotations

import torch
import triton

from . import rms_norm_triton as T
from .dispatch import use_triton

#: widest row one program holds in registers (float32); wider rows take the torch reference
MAX_COLS = 1 << 15


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` over the last dimension, as LlamaRMSNorm."""
    n = x.shape[-1]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return rms_norm_reference(x, weight, eps)  # the kernel has no backward: autograd takes HF's expression
    fits = (weight.dim() == 1 and weight.shape[0] == n and weight.dtype == x.dtype and n <= MAX_COLS
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.numel() > 0)
    if not fits or not use_triton(backend, x, weight):
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    rows = 4 if block <= 4096 else 1  # small rows: several per program, so a program moves at least 32 KB
    warps = min(16, max(1, block // 512))
    grid = (triton.cdiv(x2.shape[0], rows),)
    T.rms_norm_kernel[grid](x2, weight, out, x2.shape[0], n, x2.stride(0), out.stride(0), float(eps),
                            BLOCK=block, ROWS=rows, IS_BF16=x.dtype == torch.bfloat16, num_warps=warps)
    return out.reshape(x.shape)
