"""Triton kernels of `qaas.kernels.fp8` (launched there; the torch references are in fp8_reference.py).

* `fp8_quant_kernel`: one program per `BLOCK_R x BLOCK_C` tile of the weight; each element divides by its
  scale tile's value, rounds the quotient to the weight's dtype (as the reference, which divides in that
  dtype, does), clamps to +-448 and converts to e4m3 with round-to-nearest-even, written as the byte.
  The conversion is done on the float32 bits (`_e4m3_bits`) rather than with a float8 cast, so that it is the
  same on every GPU generation and in the interpreter.
* `fp8_dequant_kernel`: code * scale in float32, rounded to the output dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import round_to_bf16


@triton.jit
def _rint(v):
    # round half to even for |v| < 2**22 (exact with IEEE float32 adds; fused adds are disabled at launch)
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _e4m3_bits(v):
    """e4m3fn byte (as int32) of float32 values |v| <= 448, round to nearest even, subnormals included."""
    # -0.0 gives +0: compressed-tensors adds the (zero) zero point to the quotient, which turns -0 into +0
    sign = tl.where(v < 0.0, 128, 0)
    a = tl.abs(v)
    # subnormals (|v| < 2^-6): steps of 2^-9; a result of 8 is the smallest normal, whose byte is also 8
    sub = _rint(a * 512.0).to(tl.int32)
    ua = a.to(tl.uint32, bitcast=True)
    # keep 3 mantissa bits, rounding the 20 dropped ones to nearest even; the carry may bump the exponent
    r = (ua + (0x7FFFF + ((ua >> 20) & 1))) >> 20
    normal = r.to(tl.int32) - (120 << 3)  # rebias the exponent: 127 -> 7
    code = tl.where(a < 0.015625, sub, normal)
    return code | sign


@triton.jit
def fp8_quant_kernel(w_ptr, s_ptr, q_ptr, R, C, s_cols, TILE_R, TILE_C,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SRC: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    s_offs = (rows // TILE_R)[:, None] * s_cols + (cols // TILE_C)[None, :]
    s = tl.load(s_ptr + s_offs, mask=m, other=1.0).to(tl.float32)
    y = tl.math.div_rn(w, s)
    if SRC == 1:  # float16 weights: the quotient is a float16 value
        y = y.to(tl.float16).to(tl.float32)
    elif SRC == 2:  # bfloat16
        y = round_to_bf16(y)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + offs, _e4m3_bits(y).to(tl.uint8), mask=m)


@triton.jit
def _e4m3_value(b):
    """float32 value of e4m3fn bytes (int32 0..255, no NaN)."""
    e = (b >> 3) & 15
    mant = b & 7
    # a normal byte's float32 bits: exponent rebiased 7 -> 127, the 3 mantissa bits on top of its 23
    normal = (((e + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 0.001953125  # subnormals: steps of 2^-9
    v = tl.where(e == 0, sub, normal)
    return tl.where((b & 128) != 0, -v, v)


@triton.jit
def fp8_dequant_kernel(q_ptr, s_ptr, out_ptr, R, C, s_cols, TILE_R, TILE_C,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SCALE_ROUND: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    b = tl.load(q_ptr + offs, mask=m, other=0).to(tl.int32)
    s_offs = (rows // TILE_R)[:, None] * s_cols + (cols // TILE_C)[None, :]
    s = tl.load(s_ptr + s_offs, mask=m, other=1.0).to(tl.float32)
    v = _e4m3_value(b) * s
    # the reference multiplies in the scale's dtype: round the product to it first
    if SCALE_ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif SCALE_ROUND == 2:
        v = round_to_bf16(v)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = round_to_bf16(v)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)
