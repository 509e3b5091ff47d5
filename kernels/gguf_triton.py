"""Triton kernels of `qaas.kernels.gguf` (launched there; the torch references are in gguf_reference.py).

* `legacy_quant_kernel`: the 32-weight blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), BLOCKS blocks a program: each
  block's scale (and minimum) and its codes, with ggml's float32 steps: correctly rounded division
  (`div_rn`: Triton's `/` is approximate on CUDA), no fused multiply-add (the launcher passes
  `enable_fp_fusion=False`), C truncation and roundf. The bytes are packed by the launcher.

Shared by every GGUF Triton module: `_recip` (1 / d correctly rounded, 0 for d == 0) and `nearest_int` (ggml's
bit trick, as gguf_reference.nearest_int).
"""

from __future__ import annotations

import triton
import triton.language as tl

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = 0, 1, 2, 3, 4


@triton.jit
def _recip(d):
    safe = tl.where(d != 0.0, d, 1.0)
    return tl.where(d != 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), safe), 0.0)


@triton.jit
def nearest_int(v):
    # ggml's nearest_int: 1.5 * 2^23 added in float32 and the low 23 bits of the sum read back (round half to
    # even below 2^22; beyond, the same wrapped value C computes, which the clamps after it then see)
    bits = (v + 12582912.0).to(tl.int32, bitcast=True)
    return (bits & 0x007FFFFF) - 0x00400000


@triton.jit
def _first_where(x, key, v, cols):
    # x at the first column where key == v (ggml's scans keep the first: it decides the sign of a zero);
    # picked with min against +inf, which keeps -0.0 (a sum would not)
    first = tl.min(tl.where(key == v[:, None], cols[None, :], 32), axis=1)
    return tl.min(tl.where(cols[None, :] == first[:, None], x, float("inf")), axis=1)


@triton.jit
def legacy_quant_kernel(x_ptr, q_ptr, d_ptr, m_ptr, n_blocks, KIND: tl.constexpr, BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCKS + tl.arange(0, BLOCKS)
    cols = tl.arange(0, 32)
    live = rows < n_blocks
    offs = rows[:, None] * 32 + cols[None, :]
    x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0)
    if KIND == 0:
        amax = tl.max(tl.abs(x), axis=1)
        d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
        v = x * _recip(d)[:, None]
        t = v.to(tl.int32)  # truncation toward zero
        frac = v - t.to(tl.float32)
        q = t + tl.where(frac >= 0.5, 1, 0) - tl.where(frac <= -0.5, 1, 0)  # roundf: halves away from zero
        m = d
    elif KIND == 1 or KIND == 3:
        HALF: tl.constexpr = 8.0 if KIND == 1 else 16.0
        TOP: tl.constexpr = 15 if KIND == 1 else 31
        ax = tl.abs(x)
        amax = tl.max(ax, axis=1)
        # the signed value of the first weight of largest magnitude (ggml's strict `<` scan keeps the first)
        # an all-zero block keeps ggml's initial +0.0
        signed = tl.where(amax == 0.0, 0.0, _first_where(x, ax, amax, cols))
        d = tl.math.div_rn(signed, tl.full(signed.shape, -HALF, tl.float32))
        x0 = x * _recip(d)[:, None]
        q = tl.minimum((x0 + (HALF + 0.5)).to(tl.int32), TOP)
        m = d
    else:
        LEVELS: tl.constexpr = 15.0 if KIND == 2 else 31.0
        lo = _first_where(x, x, tl.min(x, axis=1), cols)
        hi = _first_where(x, x, tl.max(x, axis=1), cols)
        d = tl.math.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
        x0 = (x - lo[:, None]) * _recip(d)[:, None]
        q = (x0 + 0.5).to(tl.int32)
        if KIND == 2:
            q = tl.minimum(q, 15)
        m = lo
    tl.store(q_ptr + offs, q, mask=live[:, None])
    tl.store(d_ptr + rows, d, mask=live)
    tl.store(m_ptr + rows, m, mask=live)
