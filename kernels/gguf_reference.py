"""Torch references of the GGUF block quantizers: the bytes ggml's `quantize_row_*_ref` writes (no importance
matrix), with ggml's float32 arithmetic step by step, vectorized over blocks.

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
"""

from __future__ import annotations

import torch

QK = 32
QK_K = 256
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q6_K": 210, "Q4_K": 144, "Q5_K": 176}
BLOCK_SIZE = {"Q8_0": QK, "Q4_0": QK, "Q4_1": QK, "Q5_0": QK, "Q5_1": QK, "Q6_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K}
#: ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS = 1e-15


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
    """ggml's nearest_int (adding 1.5 * 2^23 in float32): round half to even, as torch.round."""
    return torch.round(x).to(torch.int32)


def _ordered_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in element order, in float32 (the C loop's rounding, not a tree's)."""
    cols = v.movedim(-1, 0).contiguous()  # one contiguous slice per position: the adds stream
    s = torch.zeros_like(cols[0])  # from +0.0, as the C loops start
    for i in range(cols.shape[0]):
        s += cols[i]
    return s


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) for each row of x [m, n]: (scale [m], L [m, n])."""
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    amax, signed_max = ax.gather(1, idx).squeeze(1), x.gather(1, idx).squeeze(1)
    zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x

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


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 210] bytes (see the module docstring)."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    scales, L = make_qx_quants_rmse1(sub, 32)
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
    q = L.reshape(n, 2, 4, 32)  # weight 128 h + 32 k + l
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(n, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    qh = qh.reshape(n, 64)
    return torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), q_scales.to(torch.int8).view(torch.uint8),
                      _half_bytes(d)], dim=1)


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad=false) for
    each row of x [m, n]: (scale [m], the_min [m], L [m, n] int32)."""
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
        return _ordered_sum(w * (diff * diff))

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


def _quantize_q45_k(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """[n, 256] super-blocks -> [n, 144] (Q4_K) or [n, 176] (Q5_K) bytes (see the module docstring)."""
    n = x.shape[0]
    nmax, rmin, nstep = (15, -1.0, 20) if type_name == "Q4_K" else (31, -0.5, 15)
    sub = x.reshape(n * 8, 32)
    # sqrtf is correctly rounded; torch's vectorized float32 sqrt on the CPU is not always (seen 1 ulp off):
    # the float64 root rounded to float32 is the correctly rounded float32 root
    av_x = torch.sqrt(_ordered_sum(sub * sub).to(torch.float64) / 32).to(torch.float32)
    w = av_x[:, None] + sub.abs()
    scales, mins, L = make_qkx2_quants(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)

    def running_max(v: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.float32, device=v.device)
        for j in range(8):
            m = torch.where(v[:, j] > m, v[:, j], m)
        return m

    max_scale, max_min = running_max(scales), running_max(mins)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))
    ls = torch.clamp_max(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # uint8, then MIN(63, .)
    lm = torch.clamp_max(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    packed = torch.zeros(n, 12, dtype=torch.int32, device=x.device)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d = max_scale / 63.0
    dmin = max_min / 63.0
    dd = d.to(torch.float16).to(torch.float32)[:, None] * ls.to(torch.float32)
    dm = dmin.to(torch.float16).to(torch.float32)[:, None] * lm.to(torch.float32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    l = torch.clamp(nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / safe[:, :, None]), 0, nmax)
    L = torch.where((dd != 0)[:, :, None], l, L)
    q = L.reshape(n, 4, 2, 32)  # weight 64 c + 32 h + j
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [_half_bytes(d), _half_bytes(dmin), packed.to(torch.uint8)]
    if type_name == "Q5_K":
        shifts = (2 * torch.arange(4, device=x.device)).reshape(1, 4, 1)
        qh = (((q[:, :, 0] >> 4) & 1) << shifts) | (((q[:, :, 1] >> 4) & 1) << (shifts + 1))
        parts.append(qh.sum(dim=1).to(torch.uint8))
    parts.append(qs.to(torch.uint8))
    return torch.cat(parts, dim=1)


def quantize_blocks_reference(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """float32 [rows, cols] (cols a multiple of the type's block) -> uint8 [rows, cols / block * block bytes]."""
    rows, cols = x.shape
    if type_name == "Q6_K":
        return _quantize_q6_k(x.reshape(-1, QK_K).to(torch.float32)).reshape(rows, -1).contiguous()
    if type_name in ("Q4_K", "Q5_K"):
        return _quantize_q45_k(x.reshape(-1, QK_K).to(torch.float32), type_name).reshape(rows, -1).contiguous()
    b = x.reshape(-1, QK).to(torch.float32)
    d, m, q = legacy_codes_reference(b, type_name)
    return pack_legacy(type_name, d, m, q).reshape(rows, -1).contiguous()


def legacy_codes_reference(b: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Blocks [n, 32] -> (scale d [n] float32, minimum m [n] or None, codes [n, 32] int32), for the 32-blocks."""
    if type_name == "Q8_0":
        d = b.abs().amax(dim=1) / 127
        return d, None, roundf(b * _recip(d)[:, None]).to(torch.int32)
    if type_name in ("Q4_0", "Q5_0"):
        half = 8 if type_name == "Q4_0" else 16
        d = _signed_absmax(b) / -half
        x0 = b * _recip(d)[:, None]
        return d, None, torch.clamp_max(torch.trunc(x0 + (half + 0.5)), 2 * half - 1).to(torch.int32)
    if type_name in ("Q4_1", "Q5_1"):
        lo, hi = _first_equal(b, b.amin(dim=1)), _first_equal(b, b.amax(dim=1))
        d = (hi - lo) / (15 if type_name == "Q4_1" else 31)
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
