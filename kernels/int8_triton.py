"""Triton kernels of `qaas.kernels.int8` (launched there; the torch references are in int8_reference.py).

* `int8_quant_kernel`: one program per row: the row's absmax (SCB), then the codes, one tile or a loop of tiles.
* `int8_dequant_kernel`: `q * SCB * (1/127)` in float32, rounded to the output dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import round_to_bf16


@triton.jit
def _fdividef(a, b):
    # CUDA's __fdividef(a, b) is PTX div.approx.f32.
    return tl.inline_asm_elementwise(
        "div.approx.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def _rint(v):
    # round half to even for |v| < 2**22 (exact with IEEE float32 adds; fused adds are disabled at launch)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def int8_quant_kernel(w_ptr, q_ptr, scb_ptr, cols, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
                       FLAVOR: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    r = tl.arange(0, BLOCK)
    if ONE_TILE:
        m = r < cols
        w = tl.load(w_ptr + base + r, mask=m, other=0.0).to(tl.float32)
        am = tl.max(tl.abs(w), axis=0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, cols, BLOCK):
            m = start + r < cols
            acc = tl.maximum(acc, tl.abs(tl.load(w_ptr + base + start + r, mask=m, other=0.0).to(tl.float32)))
        am = tl.max(acc, axis=0)
    tl.store(scb_ptr + row, am)
    if FLAVOR == 0:
        scale = _fdividef(tl.full([BLOCK], 127.0, tl.float32), tl.full([BLOCK], 1.0, tl.float32) * am)
    else:
        # torch evaluates `127.0 / t` as reciprocal(t) * 127 (Tensor.__rtruediv__), so does bitsandbytes' CPU op
        scale = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32), tl.full([BLOCK], 1.0, tl.float32) * am) * 127.0
    if ONE_TILE:
        qv = _rint(w * scale)
        qv = tl.where(am == 0.0, 0.0, qv)
        tl.store(q_ptr + base + r, qv.to(tl.int8), mask=m)
    else:
        for start in range(0, cols, BLOCK):
            m = start + r < cols
            w = tl.load(w_ptr + base + start + r, mask=m, other=0.0).to(tl.float32)
            qv = _rint(w * scale)
            qv = tl.where(am == 0.0, 0.0, qv)
            tl.store(q_ptr + base + start + r, qv.to(tl.int8), mask=m)


@triton.jit
def int8_dequant_kernel(q_ptr, scb_ptr, out_ptr, n, cols, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    q = tl.load(q_ptr + offs, mask=m, other=0).to(tl.float32)
    s = tl.load(scb_ptr + offs // cols, mask=m, other=0.0)
    v = (q * s) * 7.874015718698502e-3
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = round_to_bf16(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)
