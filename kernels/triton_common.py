"""Triton device helpers shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_bf16(v):
    """float32 rounded (to nearest, ties to even) to bfloat16 precision, still as float32 bits, so that the
    final cast to bfloat16 is exact everywhere (the Triton interpreter truncates when it casts float32 to
    bfloat16, the GPU rounds: without this the two disagree)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)
