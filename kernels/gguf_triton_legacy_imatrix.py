"""Triton kernels of the legacy 32-weight types with an importance matrix (ggml's quantize_row_q4_0/q4_1/q5_0/
q5_1_impl with quant_weights), launched from `qaas.kernels.gguf`; the torch reference is
gguf_reference.legacy_codes_weighted.

The error weights are qw * sqrtf(sigma2 + x^2), sigma2 the mean square of the block's whole row:
  * `row_sigma2_kernel`: sigma2 of each row, one lane a row summing x^2 in element order (C's loop; float32
    sums are not associative, so the row cannot be split), then a correctly rounded division by the width;
  * `legacy_qx_kernel` (Q4_0, Q5_0): make_qx_quants(32, NMAX, x, L, rmse_type=1, weights), the signed codes
    as they come (ggml does not requantize them): gguf_triton_symmetric's `make_qx_quants` on [B, 32] tiles;
  * `legacy_qkx_kernel` (Q4_1, Q5_1): make_qkx3_quants(32, NMAX, x, weights, L, &min, Laux, -0.9, 0.05, 36),
    which with weights given is make_qkx2_quants: gguf_triton_affine's `qkx2_fit`, one lane a block, the codes
    those of the best fit.
Float steps as in the other GGUF kernels (div_rn, sqrt_rn, the launcher passes enable_fp_fusion=False).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gguf_triton_affine import qkx2_fit
from .gguf_triton_symmetric import make_qx_quants

#: make_qkx3_quants' search in ggml's quantize_row_q4_1_impl / q5_1_impl (constexpr: a compiled kernel reads no
#: plain Python global; only the interpreter does)
RMIN: tl.constexpr = tl.constexpr(-0.9)
RDELTA: tl.constexpr = tl.constexpr(0.05)
NSTEP: tl.constexpr = tl.constexpr(36)


@triton.jit
def row_sigma2_kernel(x_ptr, sigma2_ptr, n_rows, COLS: tl.constexpr, ROWS: tl.constexpr):
    # COLS a constant: the interpreter takes no loop over a runtime bound (one compile a width on a GPU, a
    # handful a model)
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = r < n_rows
    s = tl.zeros([ROWS], tl.float32)
    for i in range(COLS):
        xi = tl.load(x_ptr + r * COLS + i, mask=live, other=0.0)
        s = s + xi * xi
    width = tl.zeros([ROWS], tl.float32) + COLS  # exact: widths are far below 2^24
    tl.store(sigma2_ptr + r, tl.math.div_rn(s, width), mask=live)


@triton.jit
def legacy_qx_kernel(x_ptr, qw_ptr, sigma2_ptr, l_ptr, d_ptr, n_blocks, blocks_per_row,
                     NMAX: tl.constexpr, B: tl.constexpr):
    """B blocks a program -> codes L [., 32] (0..2 NMAX - 1), scales d [.]."""
    cols = tl.arange(0, 32)
    blk = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    live = blk < n_blocks
    offs = blk[:, None] * 32 + cols[None, :]
    x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0)
    qw = tl.load(qw_ptr + (blk % blocks_per_row)[:, None] * 32 + cols[None, :], mask=live[:, None], other=0.0)
    sigma2 = tl.load(sigma2_ptr + blk // blocks_per_row, mask=live, other=0.0)
    w = qw * tl.sqrt_rn(sigma2[:, None] + x * x)
    d, L = make_qx_quants(x, w, cols, NMAX, 32)
    tl.store(l_ptr + offs, L, mask=live[:, None])
    tl.store(d_ptr + blk, d, mask=live)


@triton.jit
def legacy_qkx_kernel(x_ptr, qw_ptr, sigma2_ptr, l_ptr, d_ptr, m_ptr, n_blocks, blocks_per_row,
                      NMAX: tl.constexpr, B: tl.constexpr):
    """B blocks a program, one lane each -> codes L [., 32] (0..NMAX), scales d [.], minimums m [.] (ggml's
    -the_min: the block's offset, as Q4_1 / Q5_1 store it)."""
    blk = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    live = blk < n_blocks
    px = x_ptr + blk * 32
    pq = qw_ptr + (blk % blocks_per_row) * 32
    sigma2 = tl.load(sigma2_ptr + blk // blocks_per_row, mask=live, other=0.0)
    scale, mn, lo, flat, l_iscale, l_mn, sw = qkx2_fit(px, pq, live, sigma2, 32, NMAX, RMIN, RDELTA, NSTEP,
                                                       True, False)
    nn = tl.arange(0, 32)[None, :]
    offs = blk[:, None] * 32 + nn
    live_x = live[:, None] & (nn < 32)
    X = tl.load(x_ptr + offs, mask=live_x, other=0.0)
    v = l_iscale[:, None] * (X - l_mn[:, None]) + 12582912.0  # nearest_int, inline
    L = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, 0), NMAX)
    # a flat range: codes 0, scale 0, the minimum the range's (clamped) low end
    L = tl.where(flat[:, None], 0, L)
    tl.store(l_ptr + offs, L, mask=live_x)
    tl.store(d_ptr + blk, tl.where(flat, 0.0, scale), mask=live)
    tl.store(m_ptr + blk, tl.where(flat, lo, mn), mask=live)
