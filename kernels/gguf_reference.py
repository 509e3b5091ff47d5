"""Torch references of the GGUF block quantizers: the bytes ggml's `quantize_row_*_ref` writes (no importance
matrix) and its `quantize_row_*_impl` with one (quant_weights), with ggml's float32 arithmetic step by step,
vectorized over blocks.

The rules that decide the bytes (read from ggml-quants.c, re-derived here, checked against `ggml_quantize_chunk`
in tests/kernels/test_gguf_quants.py):
  * scales are computed in float32 and stored as IEEE half (round to nearest even); the codes are computed
    from the float32 scale, not from the stored half;
  * "round" is C's roundf (halves away from zero) and "(int8_t)" truncates toward zero; sqrtf is correctly
    rounded (computed here in float64 and rounded once);
  * the absolute maximum of a Q4_0/Q5_0 block keeps its sign, and the first of equal magnitudes wins; the
    minimum and maximum of a Q4_1/Q5_1 block are likewise the first such element (it decides the sign of a zero).
Block layouts (little endian), 32 weights a block:
  Q8_0  d:f16 qs:i8[32]                               34 bytes
  Q4_0  d:f16 qs:u8[16] (lo nibble j, hi nibble j+16)  18 bytes
  Q4_1  d:f16 m:f16 qs:u8[16]                          20 bytes
  Q5_0  d:f16 qh:u32 (bit 4 of weight j in bit j) qs  22 bytes
  Q5_1  d:f16 m:f16 qh:u32 qs                          24 bytes
Q6_K (super-blocks of 256 = 16 sub-blocks of 16): per sub-block ggml's `make_qx_quants(16, 32, x, rmse_type=1)`
search (the scale of 19 candidates minimising the x^2-weighted error, sums accumulated in element order, as the
C loop does: float32 sums are not associative), sub-block scales quantized to int8 against one f16 super-scale,
then the codes recomputed from the stored scales. Layout: ql:u8[128] (low nibbles), qh:u8[64] (2 high bits of
four weights), scales:i8[16], d:f16 -- 210 bytes.
Q4_K / Q5_K (super-blocks of 256 = 8 sub-blocks of 32, codes 0..15 / 0..31 with a minimum): per sub-block ggml's
`make_qkx2_quants` (weights av|x| + |x|; a first guess from the range, then nstep+1 candidate scales refit by
weighted least squares, kept when their weighted squared error is smaller), scales and minimums as 6-bit values
against two f16 super-scales, codes recomputed from the stored ones. Layout: d:f16 dmin:f16 scales:u8[12]
(6-bit pairs packed as get_scale_min_k4 reads them) [qh:u8[32], Q5_K: the fifth bits] qs:u8[128] -- 144 / 176
bytes.
Q3_K (16 sub-blocks of 16, codes -4..3): make_q3_quants (coordinate descent) per sub-block, 6-bit signed scales
against one f16 scale; layout hmask:u8[32] (third bits) qs:u8[64] (2 low bits) scales:u8[12] d:f16 -- 110 bytes.
Q2_K (16 sub-blocks of 16, codes 0..3 with a minimum): make_qkx2_quants with absolute error, 4-bit scales and
minimums; layout scales:u8[16] qs:u8[64] d:f16 dmin:f16 -- 84 bytes.
With an importance matrix qw the error weights are qw * sqrtf(sigma2 + x^2) (sigma2 a mean square of the
super-block, or of the row for the 32-blocks), the k-quants' sub-block scales are fitted by make_qp_quants,
Q4_0/Q5_0 take make_qx_quants' codes, Q4_1/Q5_1 make_qkx3_quants'. IQ4_NL (32) / IQ4_XS (256): the 16
non-linear levels of kvalues_iq4nl, each block's scale by ggml's 15-candidate search (error weights x^2
without a matrix), IQ4_XS' block scales as 6-bit values against one f16 scale.
"""

from __future__ import annotations

import torch

QK = 32
QK_K = 256
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24,
               "Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "IQ4_NL": 18, "IQ4_XS": 136}
BLOCK_SIZE = {"Q8_0": QK, "Q4_0": QK, "Q4_1": QK, "Q5_0": QK, "Q5_1": QK,
              "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "IQ4_NL": QK, "IQ4_XS": QK_K}
#: ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS = 1e-15
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf in float32: halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(x)
    frac = x - t  # exact in float32
    return t + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def _half_bytes(v: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] uint8: IEEE half, round to nearest even, little endian."""
    return v.to(torch.float16).view(torch.int16).unsqueeze(-1).view(torch.uint8).reshape(-1, 2)


def _u32_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32).unsqueeze(-1).view(torch.uint8).reshape(-1, 4)


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b correctly rounded in float32 on every device. Both operands are made tensors of the same shape:
    torch computes a tensor divided by a Python number (and on CUDA by any CPU scalar) as a product with the
    reciprocal, and a Python number divided by a tensor likewise, which is not always the quotient C gets."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b


def _recip(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    idx = x.abs().argmax(dim=1, keepdim=True)  # first maximal value, as ggml's strict `<` scan keeps
    v = x.gather(1, idx).squeeze(1)
    return torch.where(v == 0, torch.zeros_like(v), v)  # an all-zero block keeps ggml's initial +0.0


def _first_equal(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The first element of each row equal to v: ggml's min/max scans keep the first, so of -0.0 and +0.0 the
    sign stored is the first one's."""
    idx = (x == v[:, None]).to(torch.int8).argmax(dim=1, keepdim=True)
    return x.gather(1, idx).squeeze(1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes -> [n, 16] bytes: low nibble weight j, high nibble weight j + 16."""
    q = q.to(torch.int32)
    return ((q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)).to(torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(QK, dtype=torch.int64, device=q.device)
    return bits.sum(dim=1)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, the same way: 1.5 * 2^23 added in float32 and the low 23 bits of the sum read back.
    Round half to even below 2^22; beyond (ggml asserts against it only in debug builds) the same wrapped
    value C computes, which the clamps after it then see."""
    v = (x.to(torch.float32) + 12582912.0).contiguous().view(torch.int32)
    return (v & 0x007FFFFF) - 0x00400000


def _ordered_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in element order, in float32 (the C loop's rounding, not a tree's)."""
    cols = v.movedim(-1, 0).contiguous()  # one contiguous slice per position: the adds stream
    s = torch.zeros_like(cols[0])  # from +0.0, as the C loops start
    for i in range(cols.shape[0]):
        s += cols[i]
    return s


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw) for each row of x [m, n]: (scale [m], L [m, n]);
    the error weights are qw [m, n] when given, else x^2."""
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    amax, signed_max = ax.gather(1, idx).squeeze(1), x.gather(1, idx).squeeze(1)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x if qw is None else qw

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lf = l.to(torch.float32)
        return _ordered_sum(w * x * lf), _ordered_sum(w * lf * lf)

    l = codes(torch.tensor(float(-nmax), dtype=torch.float32) / safe_max)
    L = l + nmax
    sumlx, suml2 = sums(l)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    tenth = torch.tensor(0.1, dtype=torch.float32)
    for step in range(-9, 10):
        if step == 0:
            continue
        c = torch.tensor(float(nmax), dtype=torch.float32) + tenth * torch.tensor(float(step), dtype=torch.float32)
        l = codes(-c / safe_max)
        sumlx, suml2 = sums(l)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better[:, None], l + nmax, L)
        new_scale = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, scale * sumlx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 210] bytes (see the module docstring); qw [n, 256]: importance weights, which
    ggml takes as the error weights of each sub-block's scale search as they are."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, L = make_qx_quants_rmse1(sub, 32, None if qw is None else qw.reshape(n * 16, 16))
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    idx = scales.abs().argmax(dim=1, keepdim=True)
    max_abs, max_scale = scales.abs().gather(1, idx).squeeze(1), scales.gather(1, idx).squeeze(1)
    empty = max_abs < GROUP_MAX_EPS
    iscale = torch.tensor(-128.0, dtype=torch.float32) / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = torch.where(empty, torch.zeros_like(iscale), 1 / iscale)
    q_scales = torch.clamp_max(nearest_int(iscale[:, None] * scales), 127)
    q_scales = torch.where(empty[:, None], torch.zeros_like(q_scales), q_scales)
    dd = d.to(torch.float16).to(torch.float32)[:, None] * q_scales.to(torch.float32)  # [n, 16]
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    l = torch.clamp(nearest_int(x.reshape(n, 16, 16) / safe[:, :, None]), -32, 31) + 32
    L = torch.where((dd != 0)[:, :, None], l, L)
    L = torch.where(empty[:, None, None], torch.zeros_like(L), L)
    return pack_q6_k(L.reshape(n, 256), q_scales, d)


def pack_q6_k(L: torch.Tensor, q_scales: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks' codes L [n, 256] (0..63), sub-block scales [n, 16] (int8 values) and float32 super-scales
    d [n] -> their bytes [n, 210] (layout in the module docstring)."""
    n = L.shape[0]
    q = L.to(torch.int32).reshape(n, 2, 4, 32)  # weight 128 h + 32 k + l
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    qh = qh.reshape(n, 64)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), q_scales.to(torch.int8).view(torch.uint8),
                      _half_bytes(d)], dim=1)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for each
    row of x [m, n]: (scale [m], the_min [m], L [m, n] int32). Also ggml's make_qkx3_quants with its weights
    given (the one difference, `max <= min` for `max == min`, is none: max >= min once min is clamped to 0)."""
    n = x.shape[1]
    lo, hi = x[:, 0], x[:, 0]
    sum_w, sum_x = w[:, 0], w[:, 0] * x[:, 0]
    for i in range(1, n):
        xi, wi = x[:, i], w[:, i]
        lo = torch.where(xi < lo, xi, lo)
        hi = torch.where(xi > hi, xi, hi)
        sum_w = sum_w + wi
        sum_x = sum_x + wi * xi
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731

    def codes(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return torch.clamp(nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)

    def error(scale: torch.Tensor, mn: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = scale[:, None] * L.to(torch.float32) + mn[:, None] - x
        return _ordered_sum(w * (diff.abs() if use_mad else diff * diff))

    iscale = f32(float(nmax)) / span
    scale = 1 / iscale
    L = codes(iscale, lo)
    best = error(scale, lo, L)
    mn = lo
    for step in range(nstep + 1):
        # as in the C loop, a better fit's minimum moves the range every later candidate is cut from
        span = torch.where(flat, torch.ones_like(hi), hi - mn)
        iscale = (f32(rmin) + f32(rdelta) * f32(float(step)) + f32(float(nmax))) / span
        Laux = codes(iscale, mn)
        lf = Laux.to(torch.float32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _ordered_sum(wl), _ordered_sum(wl * lf), _ordered_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        safe_d = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        safe_l2 = torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2))
        this_scale = torch.where(pos, sum_xl / safe_l2, this_scale)
        cur = error(this_scale, this_min, Laux)
        better = ok & (cur < best)
        L = torch.where(better[:, None], Laux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, lo, mn)
    return scale, -mn, L


def _quantize_q45_k(x: torch.Tensor, type_name: str, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 144] (Q4_K) or [n, 176] (Q5_K) bytes (see the module docstring); qw [n, 256]:
    importance weights."""
    n = x.shape[0]
    nmax = 15 if type_name == "Q4_K" else 31
    sub = x.reshape(n * 8, 32)
    if qw is None:
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if type_name == "Q4_K" else (-0.5, 0.1, 15)
        # sqrtf is correctly rounded; torch's vectorized float32 sqrt on the CPU is not always (seen 1 ulp off):
        # the float64 root rounded to float32 is the correctly rounded float32 root
        av_x = torch.sqrt(_ordered_sum(sub * sub).to(torch.float64) / 32).to(torch.float32)
        w = av_x[:, None] + sub.abs()
    else:
        rmin, rdelta, nstep = -0.9, 0.05, 36
        w = _super_block_weights(x, qw, 2.0).reshape(n * 8, 32)
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, rdelta, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    if qw is None:
        def running_max(v: torch.Tensor) -> torch.Tensor:
            m = torch.zeros(n, dtype=torch.float32, device=v.device)
            for j in range(8):
                m = torch.where(v[:, j] > m, v[:, j], m)
            return m

        max_scale, max_min = running_max(scales), running_max(mins)
        inv_scale = torch.where(max_scale > 0, _div(63.0, torch.where(max_scale > 0, max_scale,
                                                                     torch.ones_like(max_scale))),
                                torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, _div(63.0, torch.where(max_min > 0, max_min, torch.ones_like(max_min))),
                              torch.zeros_like(max_min))
        ls = torch.clamp_max(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # uint8, then MIN(63, .)
        lm = torch.clamp_max(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d = _div(max_scale, 63.0)
        dmin = _div(max_min, 63.0)
    else:
        sw = _ordered_sum(w).reshape(n, 8)
        d, ls = make_qp_quants(scales, 63, sw)
        dmin, lm = make_qp_quants(mins, 63, sw)
        if type_name == "Q5_K":  # only Q5_K's imatrix path clamps (make_qp_quants' codes are <= 63 but wrap)
            ls, lm = torch.clamp_max(ls, 63), torch.clamp_max(lm, 63)
    packed = pack_k4_scales(ls, lm)
    # the 6-bit values read back as get_scale_min_k4 does (the same as ls, lm whenever they are below 64)
    ls = torch.cat([packed[:, 0:4] & 63, (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)], dim=1)
    lm = torch.cat([packed[:, 4:8] & 63, (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)], dim=1)
    dd = d.to(torch.float16).to(torch.float32)[:, None] * ls.to(torch.float32)
    dm = dmin.to(torch.float16).to(torch.float32)[:, None] * lm.to(torch.float32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    l = torch.clamp(nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / safe[:, :, None]), 0, nmax)
    L = torch.where((dd != 0)[:, :, None], l, L)
    return pack_q45_k(type_name, d, dmin, packed, L.reshape(n, 256))


def pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The eight 6-bit scales and minimums [n, 8] (int32, 0..255 as ggml's uint8 holds them) -> the 12 bytes
    [n, 12] (int32) of a Q4_K / Q5_K super-block, laid out as get_scale_min_k4 reads them."""
    packed = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return packed & 0xFF


def pack_q45_k(type_name: str, d: torch.Tensor, dmin: torch.Tensor, packed: torch.Tensor,
               L: torch.Tensor) -> torch.Tensor:
    """(d, dmin [n] float32, the scale bytes [n, 12] of pack_k4_scales, codes [n, 256]) -> the [n, 144] (Q4_K)
    or [n, 176] (Q5_K) bytes of the super-blocks (layout in the module docstring)."""
    n = L.shape[0]
    q = L.to(torch.int32).reshape(n, 4, 2, 32)  # weight 64 c + 32 h + j
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [_half_bytes(d), _half_bytes(dmin), packed.to(torch.uint8)]
    if type_name == "Q5_K":
        shifts = (2 * torch.arange(4, device=L.device)).reshape(1, 4, 1)
        qh = (((q[:, :, 0] >> 4) & 1) << shifts) | (((q[:, :, 1] >> 4) & 1) << (shifts + 1))
        parts.append(qh.sum(dim=1).to(torch.uint8))
    parts.append(qs.to(torch.uint8))
    return torch.cat(parts, dim=1)


def quantize_blocks_reference(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [rows, cols] (cols a multiple of the type's block) -> uint8 [rows, cols / block * block bytes].

    `imatrix` [cols]: the importance of each column (ggml's quant_weights), or None for ggml's reference
    quantizers; Q8_0 ignores it, as ggml does."""
    rows, cols = x.shape
    x = x.to(torch.float32)
    if imatrix is not None and type_name == "Q8_0":
        imatrix = None
    qw = None
    if imatrix is not None:
        imatrix = imatrix.to(device=x.device, dtype=torch.float32)
        qw = imatrix.reshape(1, cols).expand(rows, cols).reshape(-1, BLOCK_SIZE[type_name])
    if type_name in K_QUANTS:
        blocks = x.reshape(-1, QK_K)
        if type_name == "Q6_K":
            out = _quantize_q6_k(blocks, qw)
        elif type_name in ("Q4_K", "Q5_K"):
            out = _quantize_q45_k(blocks, type_name, qw)
        elif type_name == "Q3_K":
            out = _quantize_q3_k(blocks, qw)
        else:
            out = _quantize_q2_k(blocks, qw)
        return out.reshape(rows, -1).contiguous()
    if type_name == "IQ4_NL":
        return _quantize_iq4_nl(x.reshape(-1, QK), qw).reshape(rows, -1).contiguous()
    if type_name == "IQ4_XS":
        return _quantize_iq4_xs(x.reshape(-1, QK_K), qw).reshape(rows, -1).contiguous()
    b = x.reshape(-1, QK)
    if qw is None:
        d, m, q = legacy_codes_reference(b, type_name)
    else:
        d, m, q = legacy_codes_weighted(x, qw, type_name)
    return pack_legacy(type_name, d, m, q).reshape(rows, -1).contiguous()


def legacy_codes_weighted(x: torch.Tensor, qw: torch.Tensor, type_name: str
                          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """ggml's quantize_row_q4_0/q4_1/q5_0/q5_1_impl with an importance matrix: the rows x [rows, cols], their
    blocks' qw [rows * cols / 32, 32] -> (d, m or None, codes) of the blocks. The error weights are
    qw * sqrtf(sigma2 + x^2) with sigma2 the mean square of the whole row; Q4_0/Q5_0 take make_qx_quants'
    signed codes as they come (no requantization), Q4_1/Q5_1 make_qkx3_quants' scale and minimum."""
    rows, cols = x.shape
    sigma2 = _div(_ordered_sum(x * x), float(cols))
    b = x.reshape(-1, QK)
    sigma2 = sigma2.repeat_interleave(cols // QK)[:, None]
    w = qw * torch.sqrt((sigma2 + b * b).to(torch.float64)).to(torch.float32)
    if type_name in ("Q4_0", "Q5_0"):
        d, L = make_qx_quants_rmse1(b, 8 if type_name == "Q4_0" else 16, w)
        return d, None, L
    scale, the_min, L = make_qkx2_quants(b, w, 15 if type_name == "Q4_1" else 31, -0.9, 0.05, 36)
    return scale, -the_min, L


def legacy_codes_reference(b: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Blocks [n, 32] -> (scale d [n] float32, minimum m [n] or None, codes [n, 32] int32), for the 32-blocks."""
    if type_name == "Q8_0":
        d = _div(b.abs().amax(dim=1), 127.0)
        return d, None, roundf(b * _recip(d)[:, None]).to(torch.int32)
    if type_name in ("Q4_0", "Q5_0"):
        half = 8 if type_name == "Q4_0" else 16
        d = _div(_signed_absmax(b), float(-half))
        x0 = b * _recip(d)[:, None]
        return d, None, torch.clamp_max(torch.trunc(x0 + (half + 0.5)), 2 * half - 1).to(torch.int32)
    if type_name in ("Q4_1", "Q5_1"):
        lo, hi = _first_equal(b, b.amin(dim=1)), _first_equal(b, b.amax(dim=1))
        d = _div(hi - lo, 15.0 if type_name == "Q4_1" else 31.0)
        q = torch.trunc((b - lo[:, None]) * _recip(d)[:, None] + 0.5)
        if type_name == "Q4_1":  # Q5_1's codes cannot pass 31; ggml clamps only Q4_1's
            q = torch.clamp_max(q, 15)
        return d, lo, q.to(torch.int32)
    raise ValueError(f"no reference quantizer for {type_name}")


def pack_legacy(type_name: str, d: torch.Tensor, m: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """(d, m, codes) of the 32-blocks -> their bytes [n, block bytes] (layouts in the module docstring)."""
    if type_name == "Q8_0":
        return torch.cat([_half_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)
    parts = [_half_bytes(d)]
    if m is not None:
        parts.append(_half_bytes(m))
    if type_name in ("Q5_0", "Q5_1"):
        parts.append(_u32_bytes(_high_bits(q)))
    parts.append(_nibbles(q))
    return torch.cat(parts, dim=1)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants(n, nmax, x, L, do_rmse=true) for each row of x [m, n]: (scale [m], L [m, n]).

    The first guess from the signed maximum, then up to five passes of coordinate descent, each code in turn
    moved to the value that maximises (sum w x l)^2 / (sum w l^2) with the others fixed (w = x^2): sequential
    in the elements as in C (each move changes the sums the next one sees), vectorized over the rows. A pass
    that moves nothing leaves the state as it was, so running all five (C stops early) gives the same codes."""
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    amax, signed_max = ax.gather(1, idx).squeeze(1), x.gather(1, idx).squeeze(1)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    iscale = torch.tensor(float(-nmax), dtype=torch.float32) / safe_max
    L = torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    lf = L.to(torch.float32)
    sumlx, suml2 = _ordered_sum(w * x * lf), _ordered_sum(w * lf * lf)
    wx = w * x
    for _ in range(5):
        for i in range(x.shape[1]):
            li = L[:, i].to(torch.float32)
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - w[:, i] * li * li
            pos = slx > 0
            new_l = torch.clamp(nearest_int(x[:, i] * sl2 / torch.where(pos, slx, torch.ones_like(slx))),
                                -nmax, nmax - 1)
            nl = new_l.to(torch.float32)
            slx = slx + wx[:, i] * nl
            sl2 = sl2 + w[:, i] * nl * nl
            take = pos & (new_l != L[:, i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = torch.where(take, new_l, L[:, i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), L


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qp_quants(n, nmax, x, L, quant_weights) for each row of x [m, n] (non-negative values: the
    sub-block scales or minimums of a k-quant super-block): (scale [m], L [m, n], as the uint8 C stores).

    Nine candidate scales by weighted squared error, then up to five passes of coordinate descent on the codes
    (as in make_q3_quants, sequential in the elements)."""
    mx = torch.clamp_min(x.amax(dim=1), 0.0)
    zero = mx < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(mx), mx)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731

    def mse(iscale: torch.Tensor, clamp: bool) -> torch.Tensor:
        l = nearest_int(iscale[:, None] * x)
        l = torch.clamp_max(l, nmax) if clamp else l & 0xFF  # the first guess is stored unclamped in uint8
        diff = x - (1 / iscale)[:, None] * l.to(torch.float32)
        return _ordered_sum(qw * diff * diff)

    iscale = f32(float(nmax)) / safe_max
    best = mse(iscale, clamp=False)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (f32(0.1) * f32(float(step)) + f32(float(nmax))) / safe_max
        err = mse(cand, clamp=True)
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, cand, iscale)
    l = torch.clamp_max(nearest_int(iscale[:, None] * x), nmax)
    lf = l.to(torch.float32)
    sumlx, suml2 = _ordered_sum(qw * x * lf), _ordered_sum(qw * lf * lf)
    L = l & 0xFF
    wx = qw * x
    for _ in range(5):
        for i in range(x.shape[1]):
            li = L[:, i].to(torch.float32)
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - qw[:, i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp_max(nearest_int(x[:, i] * sl2 / torch.where(ok, slx, torch.ones_like(slx))), nmax)
            nl = new_l.to(torch.float32)
            slx = slx + wx[:, i] * nl
            sl2 = sl2 + qw[:, i] * nl * nl
            take = ok & (new_l != L[:, i]) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = torch.where(take, new_l & 0xFF, L[:, i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    return (torch.where(zero, torch.zeros_like(scale), scale),
            torch.where(zero[:, None], torch.zeros_like(L), L))


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[n, 256] codes 0..3 -> [n, 64] bytes: byte 32 h + l holds weights 128 h + l + 32 k in bits 2k."""
    q = L.reshape(L.shape[0], 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64).to(torch.uint8)


def _super_block_weights(x: torch.Tensor, qw: torch.Tensor, sigma_factor: float) -> torch.Tensor:
    """ggml's imatrix error weights qw * sqrtf(sigma2 + x^2), sigma2 = factor * mean(x^2) of the rows of x
    (super-blocks, or whole rows for the 32-blocks), sums in element order; sqrtf correctly rounded."""
    sigma2 = _div(torch.tensor(sigma_factor, dtype=torch.float32) * _ordered_sum(x * x), float(x.shape[1]))
    return qw * torch.sqrt((sigma2[:, None] + x * x).to(torch.float64)).to(torch.float32)


def _quantize_q3_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 110] bytes (see the module docstring); qw [n, 256]: importance weights."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    if qw is None:
        scales, L = make_q3_quants(sub, 4)
        scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
        idx = scales.abs().argmax(dim=1, keepdim=True)  # the first of the largest magnitude, its sign kept
        max_scale = torch.where(scales.abs().gather(1, idx).squeeze(1) > 0, scales.gather(1, idx).squeeze(1),
                                torch.zeros(n, dtype=torch.float32, device=x.device))
        some = max_scale != 0
        iscale = _div(-32.0, torch.where(some, max_scale, torch.ones_like(max_scale)))
        ls = torch.clamp(nearest_int(iscale[:, None] * scales), -32, 31) + 32
        ls = torch.where(some[:, None], ls, torch.zeros_like(ls))
        d = torch.where(some, 1 / iscale, torch.zeros_like(iscale))
    else:
        weights = _super_block_weights(x, qw, 2.0).reshape(n * 16, 16)
        scales, L = make_qx_quants_rmse1(sub, 4, weights)
        scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
        d, ls = make_qx_quants_rmse1(scales, 32, _ordered_sum(weights).reshape(n, 16))
    dd = d.to(torch.float16).to(torch.float32)[:, None] * (ls - 32).to(torch.float32)  # [n, 16]
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    l = torch.clamp(nearest_int(x.reshape(n, 16, 16) / safe[:, :, None]), -4, 3) + 4
    L = torch.where((dd != 0)[:, :, None], l, L).reshape(n, 256)
    return pack_q3_k(L, ls, d)


def pack_q3_k(L: torch.Tensor, ls: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q3_K super-blocks' codes L [n, 256] (0..7), 6-bit sub-block scales ls [n, 16] (0..63) and
    float32 super-scales d [n] -> their bytes [n, 110] (layout in the module docstring)."""
    n = L.shape[0]
    L, ls = L.to(torch.int32), ls.to(torch.int32)
    high = (L > 3).to(torch.int32).reshape(n, 8, 32)  # bit k of hmask byte m: weight 32 k + m
    hmask = (high << torch.arange(8, device=L.device, dtype=torch.int32)[None, :, None]).sum(dim=1)
    packed = torch.zeros(n, 12, dtype=torch.int32, device=L.device)
    packed[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    hi = (ls >> 4).reshape(n, 4, 4)  # scale 4 q + k: its top two bits in byte 8 + k at bit 2 q
    packed[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return torch.cat([hmask.to(torch.uint8), _pack_2bit(L & 3), packed.to(torch.uint8), _half_bytes(d)], dim=1)


def _quantize_q2_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 84] bytes (see the module docstring); qw [n, 256]: importance weights."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    if qw is None:
        scales, mins, L = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)

        def running_max(v: torch.Tensor) -> torch.Tensor:
            m = torch.zeros(n, dtype=torch.float32, device=v.device)
            for j in range(16):
                m = torch.where(v[:, j] > m, v[:, j], m)
            return m

        max_scale, max_min = running_max(scales), running_max(mins)
        on_s, on_m = max_scale > 0, max_min > 0
        inv_s = _div(15.0, torch.where(on_s, max_scale, torch.ones_like(max_scale)))
        inv_m = _div(15.0, torch.where(on_m, max_min, torch.ones_like(max_min)))
        ls = torch.where(on_s[:, None], nearest_int(inv_s[:, None] * scales), 0)
        lm = torch.where(on_m[:, None], nearest_int(inv_m[:, None] * mins), 0)
        d = torch.where(on_s, _div(max_scale, 15.0), torch.zeros_like(max_scale))
        dmin = torch.where(on_m, _div(max_min, 15.0), torch.zeros_like(max_min))
    else:
        weights = _super_block_weights(x, qw, 1.0).reshape(n * 16, 16)
        scales, mins, L = make_qkx2_quants(sub, weights, 3, -0.9, 0.05, 36)
        sw = _ordered_sum(weights).reshape(n, 16)
        d, ls = make_qp_quants(scales.reshape(n, 16), 15, sw)
        dmin, lm = make_qp_quants(mins.reshape(n, 16), 15, sw)
    byte = q2_k_scale_bytes(ls, lm)
    dd = d.to(torch.float16).to(torch.float32)[:, None] * (byte & 0xF).to(torch.float32)
    dm = dmin.to(torch.float16).to(torch.float32)[:, None] * (byte >> 4).to(torch.float32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    l = torch.clamp(nearest_int((x.reshape(n, 16, 16) + dm[:, :, None]) / safe[:, :, None]), 0, 3)
    L = torch.where((dd != 0)[:, :, None], l, L.reshape(n, 16, 16)).reshape(n, 256)
    return pack_q2_k(d, dmin, byte, L)


def q2_k_scale_bytes(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The sixteen 4-bit scales and minimums [n, 16] (int32) -> the scale bytes [n, 16] (int32): scale in the low
    nibble, minimum in the high one, as the uint8 scales[j] holds them (a value past 15 spills as in C)."""
    return ((ls & 0xFF) | (lm << 4)) & 0xFF


def pack_q2_k(d: torch.Tensor, dmin: torch.Tensor, byte: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """(d, dmin [n] float32, the scale bytes [n, 16] of q2_k_scale_bytes, codes [n, 256]) -> the [n, 84] bytes."""
    return torch.cat([byte.to(torch.uint8), _pack_2bit(L.to(torch.int32)), _half_bytes(d), _half_bytes(dmin)],
                     dim=1)


#: ggml's kvalues_iq4nl: the 16 levels of the non-linear 4-bit types.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _nearest_level(v: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8(16, kvalues_iq4nl, v): the index of the nearest level, the upper one of a tie
    (the C compares x - lower < upper - x in float32)."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=v.device)
    upper = torch.clamp(torch.bucketize(v, levels, right=True), 1, 15)  # the first level above v
    lo, hi = levels[upper - 1], levels[upper]
    idx = torch.where(v - lo < hi - v, upper - 1, upper)
    return torch.where(v <= levels[0], 0, torch.where(v >= levels[15], 15, idx))


def _iq4_block_scales(x: torch.Tensor, w: torch.Tensor, ntry: int = 7) -> torch.Tensor:
    """The scale of each 32-weight block x [m, 32] (error weights w): ggml's quantize_row_iq4_nl_impl search,
    a first fit at max / 127, then the 2 ntry + 1 candidates (itry - 127) / max kept by weighted least squares
    when sum(w q x)^2 / sum(w q^2) grows; 0 for an all-zero block."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=x.device)
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    amax, mx = ax.gather(1, idx).squeeze(1), x.gather(1, idx).squeeze(1)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(mx), mx)

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = levels[_nearest_level(inv[:, None] * x)]
        wq = w * q
        return _ordered_sum(wq * x), _ordered_sum(wq * q)

    d = _div(-safe_max, float(IQ4_LEVELS[0]))
    sumqx, sumq2 = fit(1 / d)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), torch.zeros_like(d))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit(_div(float(itry + IQ4_LEVELS[0]), safe_max))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _iq4_weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """The error weights of the blocks of super-blocks x [n, S]: x^2, or qw * sqrtf(sigma2 + x^2) with sigma2
    = sum(x^2) * (2 / S) (ggml's order)."""
    if qw is None:
        return x * x
    sigma2 = _ordered_sum(x * x) * torch.tensor(2.0 / x.shape[1], dtype=torch.float32)
    return qw * torch.sqrt((sigma2[:, None] + x * x).to(torch.float64)).to(torch.float32)


def _pack_iq4_codes(L: torch.Tensor) -> torch.Tensor:
    """[n, S] level indices -> [n, S / 2] bytes: per 32 weights, low nibble j, high nibble j + 16."""
    return _nibbles(L.reshape(-1, 32)).reshape(L.shape[0], -1)


def _quantize_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 32] blocks -> [n, 18] bytes: d:f16 qs:u8[16]; the codes re-chosen from the float32 scale."""
    d = _iq4_block_scales(x, _iq4_weights(x, qw))
    L = _nearest_level(_recip(d)[:, None] * x)
    return pack_iq4_nl(d, L)


def pack_iq4_nl(d: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """IQ4_NL blocks' float32 scales d [n] and level indices L [n, 32] -> their bytes [n, 18]."""
    return torch.cat([_half_bytes(d), _pack_iq4_codes(L.to(torch.int32))], dim=1)


def _quantize_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 136] bytes: d:f16 scales_h:u16 (2 high bits of block k's 6-bit scale at
    bit 2 k) scales_l:u8[4] (low nibbles, block 2 i + 1 high) qs:u8[128]. The eight block scales quantized
    against d = -max / 32 (max: the scale of largest magnitude), the codes re-chosen from d * l in float32."""
    n = x.shape[0]
    w = _iq4_weights(x, qw).reshape(n * 8, 32)
    scales = _iq4_block_scales(x.reshape(n * 8, 32), w).reshape(n, 8)
    idx = scales.abs().argmax(dim=1, keepdim=True)  # the first of the largest magnitude (0 when all are 0)
    max_scale = torch.where(scales.abs().gather(1, idx).squeeze(1) > 0, scales.gather(1, idx).squeeze(1),
                            torch.zeros(n, dtype=torch.float32, device=x.device))
    d = _div(-max_scale, 32.0)  # -0.0 when every block is zero, as C stores it
    l = torch.clamp(nearest_int(_recip(d)[:, None] * scales), -32, 31)
    dl = d[:, None] * l.to(torch.float32)
    L = _nearest_level(_recip(dl).reshape(n, 8, 1) * x.reshape(n, 8, 32)).reshape(n, 256)
    return pack_iq4_xs(d, l + 32, L)


def pack_iq4_xs(d: torch.Tensor, l: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """IQ4_XS super-blocks' float32 scales d [n], 6-bit block scales l [n, 8] (0..63) and level
    indices L [n, 256] -> their bytes [n, 136] (layout in _quantize_iq4_xs)."""
    l = l.to(torch.int32)
    scales_l = (l[:, 0::2] & 0xF) | ((l[:, 1::2] & 0xF) << 4)
    scales_h = ((l >> 4) << (2 * torch.arange(8, device=l.device, dtype=torch.int32))).sum(dim=1)
    return torch.cat([_half_bytes(d), _u16_bytes(scales_h), scales_l.to(torch.uint8), _pack_iq4_codes(L)], dim=1)


def _u16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.int32).to(torch.int16).unsqueeze(-1).view(torch.uint8).reshape(-1, 2)
