"""Triton kernel of the affine k-quants of `qaas.kernels.gguf` (codes with a per-sub-block minimum): Q2_K, Q4_K,
Q5_K, with and without an importance matrix. The torch reference, and why each step is what it is, is in
gguf_reference.py (`_quantize_q45_k`, `_quantize_q2_k`, `make_qkx2_quants`, `make_qp_quants`).

`affine_k_quant_kernel`: SB super-blocks of 256 weights a program, each S sub-blocks of N weights (Q2_K: 16 x 16,
Q4_K / Q5_K: 8 x 32), one lane a sub-block ([SB * S] vectors; the super-block steps see them as [SB, S] tiles).
It computes, with ggml's float32 steps:
  1. each sub-block's scale and minimum: make_qkx2_quants (a first fit from the range, then NSTEP + 1 candidate
     scales refit by weighted least squares, kept when their weighted error is smaller), the error weights
     av|x| + |x| (Q4_K, Q5_K), |x| (Q2_K, absolute error) or qw * sqrtf(sigma2 + x^2) with an importance matrix;
  2. the super-block's two scales and the sub-blocks' 6-bit (4-bit for Q2_K) scales and minimums: from the
     largest ones, or with an importance matrix by make_qp_quants (nine candidates, then coordinate descent);
  3. the codes again from the scales as they are stored (half super-scales times the read-back small ones).
Every sum the C code accumulates in a loop over a sub-block is accumulated by its lane in the same element
order, a static loop over the elements that loads each from x (float32 additions are not associative; the
super-block steps take the columns of their [SB, S] tiles one at a time); divisions are correctly rounded (`div_rn`: Triton's `/` is not on
CUDA), square roots too (`sqrt_rn`), and the launcher passes `enable_fp_fusion=False` (no fused multiply-add:
C rounds each product). Outputs: d, dmin [n] float32, the small scales and minimums [n, S] int32 (0..255, as
ggml's uint8 holds them before packing) and the codes [n, 256] int32; the launcher packs them with the
reference's packers.

`qkx2_fit` (step 1 for one lane's N weights) is also the fit of Q4_1 / Q5_1 with an importance matrix
(gguf_triton_legacy_imatrix.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .gguf_triton import nearest_int

Q2_K, Q4_K, Q5_K = 0, 1, 2
#: ggml's GROUP_MAX_EPS (make_qp_quants: a group whose largest value is below it is all zeros)
GROUP_MAX_EPS = tl.constexpr(1e-15)


@triton.jit
def _fdiv(a, b):
    """a / b correctly rounded (a may be a Python number)."""
    return tl.math.div_rn(tl.zeros(b.shape, tl.float32) + a, b)


@triton.jit
def _icol(v, kk, j):
    """Column j of an int [SB, S] tile. A float column is taken as max(where(kk == j, v, -inf)): exact, signed
    zeros kept; written out where it is used. Both through `tl.reduce` with tl.max's / tl.sum's combine
    functions: what tl.max and tl.sum run, without their jit wrappers, which the interpreter the CPU tests run
    pays for at every call (milliseconds each: it re-patches triton.language)."""
    return tl.reduce(tl.where(kk == j, v, 0), 1, tl.standard._sum_combine)


@triton.jit
def _row_sum(v, kk, S: tl.constexpr):
    """Sum over the S columns of a float [SB, S] tile in column order, from +0.0 (the C loop's rounding)."""
    s = tl.zeros([v.shape[0]], tl.float32)
    for j in range(S):
        s = s + tl.reduce(tl.where(kk == j, v, float("-inf")), 1, tl.standard._elementwise_max)
    return s


@triton.jit
def _qp_mse(x, qw, iscale, kk, NMAX: tl.constexpr, S: tl.constexpr, CLAMP: tl.constexpr):
    l = nearest_int(iscale[:, None] * x)
    if CLAMP:
        l = tl.minimum(l, NMAX)
    else:
        l = l & 0xFF  # the first guess is stored unclamped in uint8
    diff = x - _fdiv(1.0, iscale)[:, None] * l.to(tl.float32)
    return _row_sum(qw * diff * diff, kk, S)


@triton.jit
def _qp_try(x, qw, safe_max, step, best, iscale, kk, NMAX: tl.constexpr, S: tl.constexpr):
    stepf = tl.zeros(safe_max.shape, tl.float32) + step
    cand = tl.math.div_rn(0.1 * stepf + NMAX, safe_max)
    err = _qp_mse(x, qw, cand, kk, NMAX, S, True)
    better = err < best
    return tl.where(better, err, best), tl.where(better, cand, iscale)


@triton.jit
def _qp_quants(x, qw, kk, NMAX: tl.constexpr, S: tl.constexpr):
    """ggml's make_qp_quants(S, NMAX, x, L, qw) for each row of the [SB, S] tile x (non-negative values: the
    sub-block scales or minimums): (scale [SB], L [SB, S] int32 as the uint8 C stores)."""
    mx = tl.max(x, axis=1)
    mx = tl.where(mx > 0.0, mx, 0.0)
    zero = mx < GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, mx)
    iscale = _fdiv(NMAX * 1.0, safe_max)
    best = _qp_mse(x, qw, iscale, kk, NMAX, S, False)
    for step in range(-4, 0):
        best, iscale = _qp_try(x, qw, safe_max, step, best, iscale, kk, NMAX, S)
    for step in range(1, 5):
        best, iscale = _qp_try(x, qw, safe_max, step, best, iscale, kk, NMAX, S)
    l = tl.minimum(nearest_int(iscale[:, None] * x), NMAX)
    lf = l.to(tl.float32)
    sumlx = _row_sum(qw * x * lf, kk, S)
    suml2 = _row_sum(qw * lf * lf, kk, S)
    L = l & 0xFF
    wx = qw * x
    # coordinate descent: each code in turn moved where (sum w x l)^2 / (sum w l^2) grows, the others fixed;
    # at most five passes. C stops a row at a pass that moves nothing; here the program stops when no row
    # moved (a pass over a row that did not move in the last one leaves it as it is)
    passes = tl.zeros([], tl.int32)
    moved = tl.zeros([], tl.int32) + 1
    while (moved > 0) & (passes < 5):
        took = tl.zeros([x.shape[0]], tl.int32)
        for i in range(S):
            at = kk == i
            # the columns i, taken inline (a call costs in the interpreter)
            Li = tl.reduce(tl.where(at, L, 0), 1, tl.standard._sum_combine)
            li = Li.to(tl.float32)
            wxi = tl.reduce(tl.where(at, wx, float("-inf")), 1, tl.standard._elementwise_max)
            qwi = tl.reduce(tl.where(at, qw, float("-inf")), 1, tl.standard._elementwise_max)
            xi = tl.reduce(tl.where(at, x, float("-inf")), 1, tl.standard._elementwise_max)
            slx = sumlx - wxi * li
            sl2 = suml2 - qwi * li * li
            ok = (slx > 0.0) & (sl2 > 0.0)
            v = tl.math.div_rn(xi * sl2, tl.where(ok, slx, 1.0)) + 12582912.0  # nearest_int, inline
            new_l = tl.minimum((v.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, NMAX)
            nl = new_l.to(tl.float32)
            slx = slx + wxi * nl
            sl2 = sl2 + qwi * nl * nl
            take = ok & (new_l != Li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L = tl.where(at & take[:, None], (new_l & 0xFF)[:, None], L)
            sumlx = tl.where(take, slx, sumlx)
            suml2 = tl.where(take, sl2, suml2)
            took = took | take.to(tl.int32)
        moved = tl.max(took, axis=0)
        passes += 1
    scale = tl.where(suml2 > 0.0, tl.math.div_rn(sumlx, tl.where(suml2 > 0.0, suml2, 1.0)), 0.0)
    return tl.where(zero, 0.0, scale), tl.where(zero[:, None], 0, L)


@triton.jit
def _largest(v):
    """ggml's running maximum from 0 with a strict `>`: the largest positive value of each row, else +0.0."""
    m = tl.max(v, axis=1)
    return tl.where(m > 0.0, m, 0.0)


@triton.jit
def _error_weight(xj, pqj, live, aux, HAS_QW: tl.constexpr, USE_MAD: tl.constexpr):
    """An element's error weight (see the module docstring): xj the element, pqj its importance's address (read
    only with an importance matrix), aux sigma2 with an importance matrix, else av_x."""
    if HAS_QW:
        w = tl.load(pqj, mask=live, other=0.0) * tl.sqrt_rn(aux + xj * xj)
    elif USE_MAD:
        w = tl.abs(xj)
    else:
        w = aux + tl.abs(xj)
    return w


@triton.jit
def qkx2_fit(px, pq, live, aux, N: tl.constexpr, NMAX: tl.constexpr, RMIN: tl.constexpr, RDELTA: tl.constexpr,
             NSTEP: tl.constexpr, HAS_QW: tl.constexpr, USE_MAD: tl.constexpr):
    """ggml's make_qkx2_quants(N, NMAX, x, weights, L, &the_min, Laux, RMIN, RDELTA, NSTEP, USE_MAD) for each lane:
    px the address of its N weights, pq of their importances (read only with HAS_QW), aux its sigma2 (HAS_QW)
    or av_x (see `_error_weight`). Returns (scale, min, lo, flat, l_iscale, l_mn, sw): the best fit's scale and
    minimum (as the C loop leaves them, before its flat-range rule), the range's low end clamped to 0, whether
    the range is flat, the (iscale, min) the best fit's codes are cut at (nearest_int(l_iscale * (x - l_mn))
    clamped to 0..NMAX) and the lane's summed error weight (from +0.0)."""
    zeros = tl.zeros(live.shape, tl.float32)
    # make_qkx2_quants: the range and the weighted sums, as the C loop runs them (from element 0)
    x0 = tl.load(px, mask=live, other=0.0)
    w0 = _error_weight(x0, pq, live, aux, HAS_QW, USE_MAD)
    lo = x0
    hi = x0
    sum_w = w0
    sum_x = w0 * x0
    sw = zeros + w0  # the sub-block's total weight from +0.0, as make_qp_quants' callers sum it
    for j in tl.static_range(1, N):
        xj = tl.load(px + j, mask=live, other=0.0)
        wj = _error_weight(xj, pq + j, live, aux, HAS_QW, USE_MAD)
        lo = tl.where(xj < lo, xj, lo)
        hi = tl.where(xj > hi, xj, hi)
        sum_w = sum_w + wj
        sum_x = sum_x + wj * xj
        sw = sw + wj
    lo = tl.where(lo > 0.0, 0.0, lo)
    flat = hi == lo
    mn = lo
    scale = zeros
    best = zeros
    l_iscale = zeros  # the codes of the best fit are those cut at (l_iscale, l_mn): recomputed at the end
    l_mn = lo
    # candidate -1 is the first guess (nmax / range, its scale the reciprocal, the minimum the range's); each
    # later one is refit by weighted least squares and kept when its error is smaller. A loop, not unrolled:
    # its body holds the two static passes over the N elements (2 N element steps). Those passes stay fully
    # unrolled (tl.static_range): on the H200, rolled or unrolled by 4 or 8 they ran 4096^2 in 3.35 ms (Q4_K)
    # instead of 0.57 ms; the price is the compile, 7-19 s per variant on one CPU core, paid once per
    # deployment (TRITON_CACHE_DIR on the data volume). bench/results/gguf_kernels_gpu-unroll*.json
    for step in range(-1, NSTEP + 1):
        # a better fit's minimum moves the range every later candidate is cut from (as in the C loop)
        span = tl.where(flat, 1.0, hi - mn)
        if step < 0:
            isc = _fdiv(NMAX * 1.0, span)
        else:
            isc = tl.math.div_rn((RMIN + RDELTA * (zeros + step)) + NMAX, span)
        sum_l = zeros
        sum_l2 = zeros
        sum_xl = zeros
        for j in tl.static_range(N):
            xj = tl.load(px + j, mask=live, other=0.0)
            wj = _error_weight(xj, pq + j, live, aux, HAS_QW, USE_MAD)
            v = isc * (xj - mn) + 12582912.0  # nearest_int, inline
            lj = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, 0),
                            NMAX).to(tl.float32)
            wl = wj * lj
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * lj
            sum_xl = sum_xl + wl * xj
        if step < 0:
            ok = zeros == 0.0
            this_scale = _fdiv(1.0, isc)
            this_min = mn
        else:
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0.0
            safe_d = tl.where(ok, D, 1.0)
            this_scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, safe_d)
            this_min = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, safe_d)
            pos = this_min > 0.0
            this_min = tl.where(pos, 0.0, this_min)
            this_scale = tl.where(pos, tl.math.div_rn(sum_xl, tl.where(sum_l2 != 0.0, sum_l2, 1.0)), this_scale)
        cur = zeros
        for j in tl.static_range(N):
            xj = tl.load(px + j, mask=live, other=0.0)
            wj = _error_weight(xj, pq + j, live, aux, HAS_QW, USE_MAD)
            v = isc * (xj - mn) + 12582912.0  # the same codes as the pass above
            lj = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, 0),
                            NMAX).to(tl.float32)
            diff = this_scale * lj + this_min - xj
            if USE_MAD:
                diff = tl.abs(diff)
            else:
                diff = diff * diff
            cur = cur + wj * diff
        if step < 0:
            better = ok
        else:
            better = ok & (cur < best)
        l_iscale = tl.where(better, isc, l_iscale)
        l_mn = tl.where(better, mn, l_mn)
        best = tl.where(better, cur, best)
        scale = tl.where(better, this_scale, scale)
        mn = tl.where(better, this_min, mn)
    return scale, mn, lo, flat, l_iscale, l_mn, sw


@triton.jit
def affine_k_quant_kernel(x_ptr, qw_ptr, q_ptr, d_ptr, dmin_ptr, ls_ptr, lm_ptr, n_sb, sb_per_row,
                          KIND: tl.constexpr, HAS_QW: tl.constexpr, SB: tl.constexpr, S: tl.constexpr,
                          N: tl.constexpr, NMAX: tl.constexpr, RMIN: tl.constexpr, RDELTA: tl.constexpr,
                          NSTEP: tl.constexpr, USE_MAD: tl.constexpr, SIGMA_FACTOR: tl.constexpr):
    # One lane a sub-block: the fit's sums run over the sub-block's elements in a static loop, element j loaded
    # straight from x (the same 128-byte line for all N loads of a lane: they hit L1), so every sum is the C
    # loop's in its order with no column extraction and no scratch. The error weights are recomputed where an
    # element is read (registers cannot be indexed by j). The super-block steps see the lanes as [SB, S].
    R: tl.constexpr = SB * S
    pid = tl.program_id(0)
    sub = pid * R + tl.arange(0, R)  # the launch's sub-blocks, in memory order
    live = sub < n_sb * S
    px = x_ptr + sub * N
    if HAS_QW:
        # sigma2 = factor * sum(x^2) / 256 over the super-block (each of its lanes sums it, in element order)
        s = tl.zeros([R], tl.float32)
        for i in range(256):
            xi = tl.load(x_ptr + (sub // S) * 256 + i, mask=live, other=0.0)
            s = s + xi * xi
        aux = _fdiv(SIGMA_FACTOR * s, tl.zeros([R], tl.float32) + 256.0)
        pq = qw_ptr + ((sub // S) % sb_per_row) * 256 + (sub % S) * N  # the sub-block's first column's importance
    else:
        pq = px  # never read
        aux = tl.zeros([R], tl.float32)
        if not USE_MAD:
            # av_x = sqrtf(sum(x^2) / 32) over the sub-block
            for j in tl.static_range(N):
                xj = tl.load(px + j, mask=live, other=0.0)
                aux = aux + xj * xj
            aux = tl.sqrt_rn(_fdiv(aux, tl.zeros([R], tl.float32) + 32.0))

    scale, mn, lo, flat, l_iscale, l_mn, sw = qkx2_fit(px, pq, live, aux, N, NMAX, RMIN, RDELTA, NSTEP, HAS_QW,
                                                       USE_MAD)
    sw = tl.reshape(sw, (SB, S))
    scales = tl.reshape(tl.where(flat, 0.0, scale), (SB, S))
    # exact negation: compiled, a unary minus is 0 - x, +0.0 for +0.0
    mins = tl.reshape(tl.where(flat, lo, mn) * -1.0, (SB, S))
    sb = pid * SB + tl.arange(0, SB)
    live_sb = sb < n_sb
    kk = tl.arange(0, S)[None, :]
    live2 = live_sb[:, None] & (kk < S)

    # the super-block's scales
    if HAS_QW:
        d, ls = _qp_quants(scales, sw, kk, 15 if KIND == 0 else 63, S)
        dmin, lm = _qp_quants(mins, sw, kk, 15 if KIND == 0 else 63, S)
        if KIND == 2:  # only Q5_K's imatrix path clamps (make_qp_quants' codes wrap past 63)
            ls = tl.minimum(ls, 63)
            lm = tl.minimum(lm, 63)
    else:
        QMAX: tl.constexpr = 15 if KIND == 0 else 63
        max_scale = _largest(scales)
        max_min = _largest(mins)
        on_s = max_scale > 0.0
        on_m = max_min > 0.0
        inv_s = tl.where(on_s, _fdiv(QMAX * 1.0, tl.where(on_s, max_scale, 1.0)), 0.0)
        inv_m = tl.where(on_m, _fdiv(QMAX * 1.0, tl.where(on_m, max_min, 1.0)), 0.0)
        ls = nearest_int(inv_s[:, None] * scales)
        lm = nearest_int(inv_m[:, None] * mins)
        if KIND == 0:
            ls = tl.where(on_s[:, None], ls, 0)
            lm = tl.where(on_m[:, None], lm, 0)
            d = tl.where(on_s, _fdiv(max_scale, tl.zeros([SB], tl.float32) + 15.0), 0.0)
            dmin = tl.where(on_m, _fdiv(max_min, tl.zeros([SB], tl.float32) + 15.0), 0.0)
        else:
            ls = tl.minimum(ls & 0xFF, 63)  # uint8, then MIN(63, .)
            lm = tl.minimum(lm & 0xFF, 63)
            d = _fdiv(max_scale, tl.zeros([SB], tl.float32) + 63.0)
            dmin = _fdiv(max_min, tl.zeros([SB], tl.float32) + 63.0)

    # the small scales as the decoder reads them back from their bytes
    if KIND == 0:
        byte = ((ls & 0xFF) | (lm << 4)) & 0xFF
        ls_r = byte & 0xF
        lm_r = byte >> 4
    else:
        # get_scale_min_k4 of the 12 bytes (the same as ls, lm whenever they are below 64)
        ls_r = tl.zeros([SB, S], tl.int32)
        lm_r = tl.zeros([SB, S], tl.int32)
        for j in tl.static_range(4):
            a = _icol(ls, kk, j)
            b = _icol(ls, kk, j + 4)
            am = _icol(lm, kk, j)
            bm = _icol(lm, kk, j + 4)
            p0 = (a | ((b >> 4) << 6)) & 0xFF
            p4 = (am | ((bm >> 4) << 6)) & 0xFF
            p8 = ((b & 0xF) | ((bm & 0xF) << 4)) & 0xFF
            ls_r = tl.where(kk == j, (p0 & 63)[:, None], ls_r)
            ls_r = tl.where(kk == j + 4, ((p8 & 0xF) | ((p0 >> 6) << 4))[:, None], ls_r)
            lm_r = tl.where(kk == j, (p4 & 63)[:, None], lm_r)
            lm_r = tl.where(kk == j + 4, ((p8 >> 4) | ((p4 >> 6) << 4))[:, None], lm_r)
    dd = tl.reshape(d.to(tl.float16).to(tl.float32)[:, None] * ls_r.to(tl.float32), (R,))[:, None]
    dm = tl.reshape(dmin.to(tl.float16).to(tl.float32)[:, None] * lm_r.to(tl.float32), (R,))[:, None]
    nn = tl.arange(0, N)[None, :]
    xoff = sub[:, None] * N + nn
    live_x = live[:, None] & (nn < N)
    X = tl.load(x_ptr + xoff, mask=live_x, other=0.0)
    on = dd != 0.0
    v = tl.math.div_rn(X + dm, tl.where(on, dd, 1.0)) + 12582912.0  # nearest_int, inline
    L = tl.minimum(tl.maximum((v.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, 0), NMAX)
    # a sub-block whose stored scale is 0 keeps the codes of its fit
    v0 = l_iscale[:, None] * (X - l_mn[:, None]) + 12582912.0
    L0 = tl.minimum(tl.maximum((v0.to(tl.int32, bitcast=True) & 0x007FFFFF) - 0x00400000, 0), NMAX)
    L = tl.where(on, L, tl.where(flat[:, None], 0, L0))
    tl.store(q_ptr + xoff, L, mask=live_x)
    tl.store(d_ptr + sb, d, mask=live_sb)
    tl.store(dmin_ptr + sb, dmin, mask=live_sb)
    tl.store(ls_ptr + sb[:, None] * S + kk, ls, mask=live2)
    tl.store(lm_ptr + sb[:, None] * S + kk, lm, mask=live2)


#: per type: (S sub-blocks of N weights, NMAX) and make_qkx2_quants' (rmin, rdelta, nstep, use_mad) without and
#: with an importance matrix, and the factor of the imatrix weights' sigma2
SHAPES = {"Q2_K": (Q2_K, 16, 16, 3), "Q4_K": (Q4_K, 8, 32, 15), "Q5_K": (Q5_K, 8, 32, 31)}
SEARCH = {"Q2_K": (-0.5, 0.1, 15, True), "Q4_K": (-1.0, 0.1, 20, False), "Q5_K": (-0.5, 0.1, 15, False)}
SEARCH_QW = (-0.9, 0.05, 36, False)
SIGMA_FACTOR = {"Q2_K": 1.0, "Q4_K": 2.0, "Q5_K": 2.0}

#: a program's size on the GPU, in one place for a sweep to set: sub-blocks a program (one lane each: 128 fills
#: 4 warps; a multiple of every type's S, so super-blocks stay whole) and warps
GPU_SUBBLOCKS = 128
GPU_WARPS = 4
#: in the interpreter, whose cost is per operation, not per element, the fewest programs are fastest
INTERPRETER_SUBBLOCKS = 4096


def program_shape(type_name: str, interpreted: bool) -> tuple[int, int]:
    """(super-blocks a program, warps) of `type_name`'s launch."""
    subs = SHAPES[type_name][1]
    return (INTERPRETER_SUBBLOCKS if interpreted else GPU_SUBBLOCKS) // subs, GPU_WARPS
