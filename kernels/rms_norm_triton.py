"""Triton kernel of `qaas.kernels.rms_norm`: one program normalizes rows of x in one read and one write."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import round_to_bf16


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, x_stride, out_stride, eps,
                    BLOCK: tl.constexpr, ROWS: tl.constexpr, IS_BF16: tl.constexpr):  # fmt: skip
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        if row < n_rows:
            x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            # HF's order: normalize in float32, round to the input's dtype, multiply by the weight, round again
            y = x * r
            if IS_BF16:
                y = round_to_bf16(y)
                y = round_to_bf16(w * y)
            else:
                y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
                y = w * y
            tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
