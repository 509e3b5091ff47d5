"""The Hessian GPTQ needs per linear layer: H = 2/n * sum over calibration tokens of x x^T.

Accumulated as a float32 sum of X^T X plus a token count, averaged once at the end (the same value as the
paper's running average). On CUDA the product runs on TF32 tensor cores when the activations are float16:
fp16 has the same 10-bit mantissa as TF32, so the operands are exact and accumulation stays float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.device != self.sum.device:
            x = x.to(self.sum.device)
        exact_tf32 = x.is_cuda and x.dtype == torch.float16
        x = x.float()
        with tf32_matmuls(exact_tf32):
            self.sum.addmm_(x.t(), x)
        self.n += x.shape[0]

    def finalize(self) -> torch.Tensor:
        """H = 2/n X^T X (float32). The accumulator's memory is reused for the result."""
        if self.n == 0:
            return self.sum
        return self.sum.mul_(2.0 / self.n)
