"""Triton kernels of `qaas.kernels.gptq` (launched there; their torch references are in `gptq_reference.py`).

* `group_params_kernel`: scale/zero of each row over one group of columns per program.
* `gptq_block_kernel`: one lazy-batch block of GPTQ's column loop, BLOCK_R rows per program kept in registers.
* `pack_kernel`: one run of 32 codes along K into BITS int32 words (the little-endian bit stream).
* `dequant_kernel`: unpack codes and zeros (`_packed_field`), scale, write `[out, in]`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    # torch.round semantics without libdevice (which the interpreter lacks).
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def group_params_kernel(
    W, S, Z, R, NG, GS, stride_wr, stride_sr, maxq,
    SYM: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_G)
    rmask = rows < R
    cmask = cols < GS
    m = rmask[:, None] & cmask[None, :]
    x = tl.load(W + rows[:, None] * stride_wr + g * GS + cols[None, :], mask=m, other=0.0).to(tl.float32)
    xmin = tl.minimum(tl.min(tl.where(m, x, float("inf")), axis=1), 0.0)
    xmax = tl.maximum(tl.max(tl.where(m, x, float("-inf")), axis=1), 0.0)
    if SYM:
        xmax = tl.maximum(-xmin, xmax)
        xmin = tl.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0.0) & (xmax == 0.0)
    xmin = tl.where(both, -1.0, xmin)
    xmax = tl.where(both, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if ROUND:
        scale = tl.minimum(tl.maximum(scale, 5.960464477539063e-08), 65504.0)
        scale = scale.to(tl.float16).to(tl.float32)
    if SYM:
        zero = tl.zeros_like(scale) + ((maxq + 1) // 2)
    else:
        zero = tl.minimum(tl.maximum(_round_half_even(-xmin / scale), 0.0), maxq * 1.0)
    tl.store(S + rows * stride_sr + g, scale, mask=rmask)
    tl.store(Z + rows * stride_sr + g, zero, mask=rmask)


@triton.jit
def gptq_block_kernel(
    W, H, S, Z, CG, Q, E, C,
    R, stride_wr, stride_h, stride_sr, stride_qr, maxq,
    NCOL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Rows of a GPTQ block are independent: one program owns BLOCK_R rows for the whole block and keeps
    # them in registers across all its columns (one launch instead of ~5 launches per column).
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < NCOL
    m = rmask[:, None] & cmask[None, :]
    w = tl.load(W + rows[:, None] * stride_wr + cols[None, :], mask=m, other=0.0)
    qt = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    et = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    ct = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int32)
    for i in range(NCOL):
        sel = cols[None, :] == i
        x = tl.sum(tl.where(sel, w, 0.0), axis=1)
        g = tl.load(CG + i)
        s = tl.load(S + rows * stride_sr + g, mask=rmask, other=1.0)
        z = tl.load(Z + rows * stride_sr + g, mask=rmask, other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(x, s)) + z, 0.0), maxq * 1.0)
        deq = s * (q - z)
        d = tl.load(H + i * stride_h + i)
        e = (x - deq) / d
        h = tl.load(H + i * stride_h + cols, mask=cmask & (cols >= i), other=0.0)
        w = w - e[:, None] * h[None, :]
        qt = tl.where(sel, deq[:, None], qt)
        et = tl.where(sel, e[:, None], et)
        ct = tl.where(sel, q.to(tl.int32)[:, None], ct)
    off = rows[:, None] * stride_qr + cols[None, :]
    tl.store(Q + off, qt, mask=m)
    tl.store(E + off, et, mask=m)
    tl.store(C + off, ct, mask=m)


@triton.jit
def pack_kernel(Cd, P, N, stride_c, stride_p, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: one run of 32 codes along K, BLOCK_N columns → BITS output words per column.
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    j = tl.arange(0, 32)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    v = tl.load(Cd + (pid_k * 32 + j)[:, None] * stride_c + n[None, :], mask=nmask[None, :], other=0)
    v = v.to(tl.int64) & ((1 << BITS) - 1)
    start = j * BITS
    for k in tl.static_range(BITS):
        sh = start - 32 * k  # stream offset of value j relative to word k
        left = tl.where(sh >= 0, sh, 0)
        right = tl.where(sh < 0, -sh, 0)
        part = tl.where(sh[:, None] >= 0, v << left[:, None], v >> right[:, None])
        inside = (sh > -BITS) & (sh < 32)
        part = tl.where(inside[:, None], part & 0xFFFFFFFF, 0)
        word = tl.sum(part, axis=0)  # disjoint bits: sum == or
        word = tl.where(word >= 2147483648, word - 4294967296, word).to(tl.int32)
        tl.store(P + (pid_k * BITS + k) * stride_p + n, word, mask=nmask)


@triton.jit
def _packed_field(lo_ptrs, hi_ptrs, off, m, BITS: tl.constexpr):
    """The BITS-wide fields that start `off` bits into the int32 words at lo_ptrs; a field that spills
    past bit 31 (3-bit packing) continues at the bottom of the next word, at hi_ptrs."""
    lo = tl.load(lo_ptrs, mask=m, other=0).to(tl.int64) & 0xFFFFFFFF
    spill = (off + BITS) > 32
    hi = tl.load(hi_ptrs, mask=m & spill, other=0).to(tl.int64) & 0xFFFFFFFF
    val = tl.where(spill, (lo >> off) | (hi << (32 - off)), lo >> off)
    return val & ((1 << BITS) - 1)


@triton.jit
def dequant_kernel(
    QW, QZ, S, G, OUT, K, N, stride_qw, stride_qz, stride_s, stride_o,
    BITS: tl.constexpr, V1: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    km = k < K
    nm = n < N
    m = km[:, None] & nm[None, :]
    # weight codes: packed along K (32 codes in BITS words)
    start = (k % 32) * BITS
    word = (k // 32) * BITS + start // 32
    w_at = QW + word[:, None] * stride_qw + n[None, :]
    val = _packed_field(w_at, w_at + stride_qw, (start % 32)[:, None], m, BITS)
    # zeros: packed along N, one row per group
    g = tl.load(G + k, mask=km, other=0)
    zstart = (n % 32) * BITS
    zword = (n // 32) * BITS + zstart // 32
    z_at = QZ + g[:, None] * stride_qz + zword[None, :]
    zv = _packed_field(z_at, z_at + 1, (zstart % 32)[None, :], m, BITS)
    if V1:
        zv = (zv + 1) & ((1 << BITS) - 1)
    s = tl.load(S + g[:, None] * stride_s + n[None, :], mask=m, other=0.0).to(tl.float32)
    w = s * (val - zv).to(tl.float32)
    # output is [N, K] (nn.Linear layout)
    tl.store(OUT + n[None, :] * stride_o + k[:, None], w.to(OUT.dtype.element_ty), mask=m)
