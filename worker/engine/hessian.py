"""The Hessian GPTQ needs per linear layer: H = 2/n * sum over calibration tokens of x x^T.

Accumulated as a float32 sum of X^T X plus a token count, averaged once at the end (the same value as the
paper's running average). On CUDA with half-precision activations the product runs on the fp16/bf16 tensor
cores with float32 output (`torch.addmm(..., out_dtype=torch.float32)`): the product of two fp16 (or bf16)
numbers is exact in float32 and the tensor cores accumulate in float32, so the sum is the one the paper's
float32 matmul computes, up to summation order — at the half-precision rate, twice the TF32 rate of the
float32 path (which stays as the fallback for a torch without `out_dtype`, and for float32 activations).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_HALF = (torch.float16, torch.bfloat16)
#: whether this torch's CUDA mm takes out_dtype (torch >= 2.8); None until the first CUDA call finds out
_mm_out_dtype: bool | None = None


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Let float32 CUDA matmuls inside the block run on TF32 tensor cores (the global flag is restored after)."""
    if not enabled:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def add_half_gram(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """acc + x^T x in float32 from half-precision `x` [tokens, features] on the tensor cores (one GEMM whose
    epilogue reads `acc`), or None where this torch cannot (the caller then takes the float32 path)."""
    global _mm_out_dtype
    if _mm_out_dtype is False:
        return None
    try:
        g = torch.addmm(acc, x.t(), x, out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype overload, or not for these dtypes
        _mm_out_dtype = False
        return None
    _mm_out_dtype = True
    return g


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.device != self.sum.device:
            x = x.to(self.sum.device)
        self.n += x.shape[0]
        if x.is_cuda and x.dtype in _HALF:
            total = add_half_gram(self.sum, x.contiguous())
            if total is not None:
                self.sum = total  # the old sum is freed: at most two H-sized buffers at a time
                return
        # bf16 has fewer mantissa bits than TF32, fp16 the same: both exact as TF32 operands
        exact_tf32 = x.is_cuda and x.dtype in _HALF
        x = x.float()
        with tf32_matmuls(exact_tf32):
            self.sum.addmm_(x.t(), x)

    def finalize(self) -> torch.Tensor:
        """H = 2/n X^T X (float32). The accumulator's memory is reused for the result."""
        if self.n == 0:
            return self.sum
        return self.sum.mul_(2.0 / self.n)
