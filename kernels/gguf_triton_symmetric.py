"""Triton kernels of the GGUF types whose blocks have a scale and no minimum: Q6_K, Q3_K, IQ4_NL, IQ4_XS (with
and without an importance matrix), launched from `qaas.kernels.gguf`.

Each kernel is the torch reference (gguf_reference.py, where each rule is explained) step by step, for some
blocks a program, and computes the codes and scales; the launchers here pack them with the reference's packers
(one home per packing rule). The float32 steps are ggml's:
  * true divisions are `tl.math.div_rn` (Triton's `/` is approximate on CUDA) and sqrtf is `tl.sqrt_rn`;
  * no fused multiply-add: the launchers pass `enable_fp_fusion=False`;
  * where the reference sums in element order (`_ordered_sum`: float32 sums are not associative), the kernels
    add the columns one by one in a static loop; a column is read out of its tile as a sum of it and zeros,
    which is exact (only the sign of a zero can change, and a running sum from +0.0 does not see it);
  * ggml's nearest_int bit trick (`gguf_triton.nearest_int`), C's first-of-the-largest scans;
  * no unary minus where the operand can be +0.0: compiled, Triton negates as 0 - x (+0.0, where C gets -0.0;
    the interpreter's numpy gets -0.0, so only the GPU shows it).
Sub-blocks are tile rows ([SB * 16, 16] for the 16-weight sub-blocks of Q6_K / Q3_K, [SB * 8, 32] for IQ4_XS'
blocks); a program's super-block steps see them as [SB, sub-blocks] through `tl.reshape`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gguf_reference as R
from .dispatch import interpreting
from .gguf_triton import _recip, nearest_int

TYPES = ("Q3_K", "Q6_K", "IQ4_NL", "IQ4_XS")
#: ggml's GROUP_MAX_EPS (gguf_reference.GROUP_MAX_EPS): a group whose largest magnitude is below it is all zeros.
GROUP_MAX_EPS: tl.constexpr = tl.constexpr(R.GROUP_MAX_EPS)


@triton.jit
def _column(v, cols, i):
    # column i of the tile v [rows, N], exactly
    return tl.sum(tl.where(cols[None, :] == i, v, 0), axis=1)


@triton.jit
def _ordered_sum(v, cols, N: tl.constexpr):
    # the sum of each row of v [rows, N] in element order, from +0.0 (the C loop's rounding)
    s = tl.zeros((v.shape[0],), tl.float32)
    for i in tl.static_range(N):
        s += _column(v, cols, i)
    return s


@triton.jit
def _first_of_largest(v, cols, N: tl.constexpr):
    # (largest |v| of each row, the signed v of the first element that has it): ggml's strict `>` scans
    a = tl.abs(v)
    amax = tl.max(a, axis=1)
    first = tl.min(tl.where(a == amax[:, None], cols[None, :], N), axis=1)
    # picked with min against +inf, which keeps -0.0 (a sum would not)
    return amax, tl.min(tl.where(cols[None, :] == first[:, None], v, float("inf")), axis=1)


@triton.jit
def _square_sum(x_ptr, starts, live, N: tl.constexpr):
    # sum of x^2 over the N weights from each start, in element order (ggml's sum_x2 for sigma2)
    s = tl.zeros(starts.shape, tl.float32)
    for i in range(N):
        xi = tl.load(x_ptr + starts + i, mask=live, other=0.0)
        s += xi * xi
    return s


@triton.jit
def _per_row(v, SB: tl.constexpr, K: tl.constexpr):
    # v [SB] of the super-blocks -> [SB * K], one per sub-block row
    return tl.reshape(tl.broadcast_to(v[:, None], (SB, K)), (SB * K,))


@triton.jit
def make_qx_quants(x, w, cols, NMAX: tl.constexpr, N: tl.constexpr):
    # ggml's make_qx_quants(N, NMAX, x, L, rmse_type=1, w) for each row of x [rows, N]: (scale, L in 0..2 NMAX - 1);
    # gguf_reference.make_qx_quants_rmse1
    amax, signed_max = _first_of_largest(x, cols, N)
    zero = amax < GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, signed_max)
    l = tl.minimum(tl.maximum(nearest_int(tl.math.div_rn(tl.full(amax.shape, -NMAX, tl.float32), safe_max)[:, None]
                                          * x), -NMAX), NMAX - 1)
    L = l + NMAX
    lf = l.to(tl.float32)
    sumlx = _ordered_sum(w * x * lf, cols, N)
    suml2 = _ordered_sum(w * lf * lf, cols, N)
    scale = tl.where(suml2 != 0.0, tl.math.div_rn(sumlx, tl.where(suml2 != 0.0, suml2, 1.0)), 0.0)
    best = scale * sumlx
    for k in range(18):
        step = tl.zeros(amax.shape, tl.int32) + k - 9
        step = tl.where(step >= 0, step + 1, step)  # -9..-1, 1..9
        c = tl.full(amax.shape, NMAX, tl.float32) + tl.full(amax.shape, 0.1, tl.float32) * step.to(tl.float32)
        l = tl.minimum(tl.maximum(nearest_int(tl.math.div_rn(-c, safe_max)[:, None] * x), -NMAX), NMAX - 1)
        lf = l.to(tl.float32)
        sumlx = _ordered_sum(w * x * lf, cols, N)
        suml2 = _ordered_sum(w * lf * lf, cols, N)
        better = (suml2 > 0.0) & (sumlx * sumlx > best * suml2)
        L = tl.where(better[:, None], l + NMAX, L)
        scale = tl.where(better, tl.math.div_rn(sumlx, tl.where(suml2 > 0.0, suml2, 1.0)), scale)
        best = tl.where(better, scale * sumlx, best)
    return tl.where(zero, 0.0, scale), tl.where(zero[:, None], 0, L)


@triton.jit
def _make_q3_quants(x, cols, NMAX: tl.constexpr, N: tl.constexpr):
    # ggml's make_q3_quants(N, NMAX, x, L, do_rmse=true) for each row of x [rows, N]: (scale, L in 0..2 NMAX - 1);
    # the coordinate descent sequential in the elements (each move changes the sums the next one sees), all
    # five passes (one that moves nothing leaves the state as it was)
    amax, signed_max = _first_of_largest(x, cols, N)
    zero = amax < GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, signed_max)
    iscale = tl.math.div_rn(tl.full(amax.shape, -NMAX, tl.float32), safe_max)
    L = tl.minimum(tl.maximum(nearest_int(iscale[:, None] * x), -NMAX), NMAX - 1)
    w = x * x
    wx = w * x
    lf = L.to(tl.float32)
    sumlx = _ordered_sum(wx * lf, cols, N)
    suml2 = _ordered_sum(w * lf * lf, cols, N)
    for _ in range(5):
        for i in tl.static_range(N):
            xi = _column(x, cols, i)
            wi = _column(w, cols, i)
            wxi = _column(wx, cols, i)
            old = _column(L, cols, i)
            li = old.to(tl.float32)
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0.0
            new_l = tl.minimum(tl.maximum(nearest_int(tl.math.div_rn(xi * sl2, tl.where(pos, slx, 1.0))), -NMAX),
                               NMAX - 1)
            nl = new_l.to(tl.float32)
            slx = slx + wxi * nl
            sl2 = sl2 + wi * nl * nl
            take = pos & (new_l != old) & (sl2 > 0.0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L = tl.where((cols[None, :] == i) & take[:, None], new_l[:, None], L)
            sumlx = tl.where(take, slx, sumlx)
            suml2 = tl.where(take, sl2, suml2)
    scale = tl.where(suml2 > 0.0, tl.math.div_rn(sumlx, tl.where(suml2 > 0.0, suml2, 1.0)), 0.0)
    return tl.where(zero, 0.0, scale), tl.where(zero[:, None], 0, L + NMAX)


@triton.jit
def _requantize(x, dd, LO: tl.constexpr, HI: tl.constexpr, L):
    # the codes recomputed from the stored (half-rounded) sub-block scales dd [rows]; rows of scale 0 keep L
    l = tl.minimum(tl.maximum(nearest_int(tl.math.div_rn(x, tl.where(dd != 0.0, dd, 1.0)[:, None])), LO), HI) - LO
    return tl.where((dd != 0.0)[:, None], l, L)


@triton.jit
def _row_tile(x_ptr, n_rows, ROWS: tl.constexpr, N: tl.constexpr):
    """This program's ROWS rows of N weights (sub-blocks or blocks): their indices, column offsets, element
    offsets, which are live, and the weights (0 past the end)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, N)
    live = rows < n_rows
    offs = rows[:, None] * N + cols[None, :]
    return rows, cols, offs, live, tl.load(x_ptr + offs, mask=live[:, None], other=0.0)


@triton.jit
def q6_k_kernel(x_ptr, qw_ptr, l_ptr, scale_ptr, d_ptr, n_super, cols_per_row,
                HAS_QW: tl.constexpr, SB: tl.constexpr):
    """SB super-blocks a program -> codes L [., 256] (0..63), sub-block scales [., 16] (int8 values), d [.]."""
    ROWS: tl.constexpr = SB * 16
    pid = tl.program_id(0)
    _, cols, offs, live, x = _row_tile(x_ptr, n_super * 16, ROWS, 16)
    if HAS_QW:  # the importance weights as they are (ggml's quantize_row_q6_K_impl)
        w = tl.load(qw_ptr + offs % cols_per_row, mask=live[:, None], other=0.0)
    else:
        w = x * x
    scales, L = make_qx_quants(x, w, cols, 32, 16)
    s = tl.reshape(scales, (SB, 16))
    max_abs, max_scale = _first_of_largest(s, cols, 16)
    empty = max_abs < GROUP_MAX_EPS
    iscale = tl.math.div_rn(tl.full(max_abs.shape, -128.0, tl.float32), tl.where(empty, 1.0, max_scale))
    d = tl.where(empty, 0.0, _recip(iscale))
    q = tl.where(empty[:, None], 0, tl.minimum(nearest_int(iscale[:, None] * s), 127))
    dd = d.to(tl.float16).to(tl.float32)[:, None] * q.to(tl.float32)
    L = _requantize(x, tl.reshape(dd, (ROWS,)), -32, 31, L)
    L = tl.where(_per_row(empty.to(tl.int32), SB, 16)[:, None] != 0, 0, L)
    tl.store(l_ptr + offs, L, mask=live[:, None])
    sb = pid.to(tl.int64) * SB + tl.arange(0, SB)
    sb_live = sb < n_super
    tl.store(scale_ptr + sb[:, None] * 16 + cols[None, :], q, mask=sb_live[:, None])
    tl.store(d_ptr + sb, d, mask=sb_live)


@triton.jit
def q3_k_kernel(x_ptr, qw_ptr, l_ptr, ls_ptr, d_ptr, n_super, cols_per_row,
                HAS_QW: tl.constexpr, SB: tl.constexpr):
    """SB super-blocks a program -> codes L [., 256] (0..7), 6-bit sub-block scales [., 16] (0..63), d [.]."""
    ROWS: tl.constexpr = SB * 16
    pid = tl.program_id(0)
    _, cols, offs, live, x = _row_tile(x_ptr, n_super * 16, ROWS, 16)
    sb = pid.to(tl.int64) * SB + tl.arange(0, SB)
    sb_live = sb < n_super
    if HAS_QW:
        # error weights qw * sqrtf(sigma2 + x^2), sigma2 = 2 sum(x^2) / 256 of the super-block; the sub-block
        # scales fitted by make_qx_quants weighted by their sub-block's summed weights
        sigma2 = tl.math.div_rn(2.0 * _square_sum(x_ptr, sb * 256, sb_live, 256),
                                tl.full((SB,), 256.0, tl.float32))
        qw = tl.load(qw_ptr + offs % cols_per_row, mask=live[:, None], other=0.0)
        w = qw * tl.sqrt_rn(_per_row(sigma2, SB, 16)[:, None] + x * x)
        scales, L = make_qx_quants(x, w, cols, 4, 16)
        sw = tl.reshape(_ordered_sum(w, cols, 16), (SB, 16))
        d, ls = make_qx_quants(tl.reshape(scales, (SB, 16)), sw, cols, 32, 16)
    else:
        scales, L = _make_q3_quants(x, cols, 4, 16)
        s = tl.reshape(scales, (SB, 16))
        max_abs, first = _first_of_largest(s, cols, 16)
        max_scale = tl.where(max_abs > 0.0, first, 0.0)
        some = max_scale != 0.0
        iscale = tl.math.div_rn(tl.full((SB,), -32.0, tl.float32), tl.where(some, max_scale, 1.0))
        ls = tl.minimum(tl.maximum(nearest_int(iscale[:, None] * s), -32), 31) + 32
        ls = tl.where(some[:, None], ls, 0)
        d = tl.where(some, _recip(iscale), 0.0)
    dd = d.to(tl.float16).to(tl.float32)[:, None] * (ls - 32).to(tl.float32)
    L = _requantize(x, tl.reshape(dd, (ROWS,)), -4, 3, L)
    tl.store(l_ptr + offs, L, mask=live[:, None])
    tl.store(ls_ptr + sb[:, None] * 16 + cols[None, :], ls, mask=sb_live[:, None])
    tl.store(d_ptr + sb, d, mask=sb_live)


@triton.jit
def _nearest_level(v, levels_ptr):
    # ggml's best_index_int8(16, kvalues_iq4nl, v): the nearest level's index, the upper one of a tie
    upper = tl.zeros(v.shape, tl.int32)  # the first level above v: how many are <= v
    for k in tl.static_range(16):
        upper += (v >= tl.load(levels_ptr + k)).to(tl.int32)
    upper = tl.minimum(tl.maximum(upper, 1), 15)
    lo = tl.load(levels_ptr + upper - 1)
    hi = tl.load(levels_ptr + upper)
    idx = tl.where(v - lo < hi - v, upper - 1, upper)
    return tl.where(v <= tl.load(levels_ptr), 0, tl.where(v >= tl.load(levels_ptr + 15), 15, idx))


@triton.jit
def _iq4_fit(x, w, inv, cols, levels_ptr):
    # (sum w q x, sum w q^2) of the levels q nearest to inv * x, in element order
    q = tl.load(levels_ptr + _nearest_level(inv[:, None] * x, levels_ptr))
    wq = w * q
    return _ordered_sum(wq * x, cols, 32), _ordered_sum(wq * q, cols, 32)


@triton.jit
def _iq4_block_scales(x, w, cols, levels_ptr, NTRY: tl.constexpr):
    # each 32-weight block's scale: ggml's quantize_row_iq4_nl_impl search (gguf_reference._iq4_block_scales)
    amax, mx = _first_of_largest(x, cols, 32)
    zero = amax < GROUP_MAX_EPS
    safe_max = tl.where(zero, 1.0, mx)
    d = tl.math.div_rn(-safe_max, tl.full(amax.shape, -127.0, tl.float32))
    sumqx, sumq2 = _iq4_fit(x, w, _recip(d), cols, levels_ptr)
    d = tl.where(sumq2 > 0.0, tl.math.div_rn(sumqx, tl.where(sumq2 > 0.0, sumq2, 1.0)), 0.0)
    best = d * sumqx
    for t in range(2 * NTRY + 1):
        inv = tl.math.div_rn((tl.zeros(amax.shape, tl.int32) + t - NTRY - 127).to(tl.float32), safe_max)
        sumqx, sumq2 = _iq4_fit(x, w, inv, cols, levels_ptr)
        better = (sumq2 > 0.0) & (sumqx * sumqx > best * sumq2)
        d = tl.where(better, tl.math.div_rn(sumqx, tl.where(sumq2 > 0.0, sumq2, 1.0)), d)
        best = tl.where(better, d * sumqx, best)
    return tl.where(zero, 0.0, d)


@triton.jit
def iq4_nl_kernel(x_ptr, qw_ptr, levels_ptr, l_ptr, d_ptr, n_blocks, cols_per_row,
                  HAS_QW: tl.constexpr, B: tl.constexpr):
    """B 32-weight blocks a program -> level indices L [., 32], scales d [.]."""
    blk, cols, offs, live, x = _row_tile(x_ptr, n_blocks, B, 32)
    if HAS_QW:  # qw * sqrtf(sigma2 + x^2), sigma2 = sum(x^2) * (2 / 32) of the block (ggml's order)
        sigma2 = _square_sum(x_ptr, blk * 32, live, 32) * (2.0 / 32)
        qw = tl.load(qw_ptr + offs % cols_per_row, mask=live[:, None], other=0.0)
        w = qw * tl.sqrt_rn(sigma2[:, None] + x * x)
    else:
        w = x * x
    d = _iq4_block_scales(x, w, cols, levels_ptr, 7)
    L = _nearest_level(_recip(d)[:, None] * x, levels_ptr)
    tl.store(l_ptr + offs, L, mask=live[:, None])
    tl.store(d_ptr + blk, d, mask=live)


@triton.jit
def iq4_xs_kernel(x_ptr, qw_ptr, levels_ptr, l_ptr, ls_ptr, d_ptr, n_super, cols_per_row,
                  HAS_QW: tl.constexpr, SB: tl.constexpr):
    """SB super-blocks a program -> level indices L [., 256], 6-bit block scales [., 8] (0..63), d [.]."""
    ROWS: tl.constexpr = SB * 8
    pid = tl.program_id(0)
    blk, cols, offs, live, x = _row_tile(x_ptr, n_super * 8, ROWS, 32)
    sb = pid.to(tl.int64) * SB + tl.arange(0, SB)
    sb_live = sb < n_super
    if HAS_QW:  # qw * sqrtf(sigma2 + x^2), sigma2 = sum(x^2) * (2 / 256) of the super-block (ggml's order)
        sigma2 = _square_sum(x_ptr, sb * 256, sb_live, 256) * (2.0 / 256)
        qw = tl.load(qw_ptr + offs % cols_per_row, mask=live[:, None], other=0.0)
        w = qw * tl.sqrt_rn(_per_row(sigma2, SB, 8)[:, None] + x * x)
    else:
        w = x * x
    s = tl.reshape(_iq4_block_scales(x, w, cols, levels_ptr, 7), (SB, 8))
    eight = tl.arange(0, 8)
    max_abs, first = _first_of_largest(s, eight, 8)
    max_scale = tl.where(max_abs > 0.0, first, 0.0)
    # C's -max_scale / 32, written max_scale / -32 (the same quotient): Triton's unary minus is 0 - x on the GPU,
    # +0.0 for +0.0, and C stores -0.0 when every block is zero
    d = tl.math.div_rn(max_scale, tl.full((SB,), -32.0, tl.float32))
    l = tl.minimum(tl.maximum(nearest_int(_recip(d)[:, None] * s), -32), 31)
    dl = tl.reshape(d[:, None] * l.to(tl.float32), (ROWS,))
    L = _nearest_level(_recip(dl)[:, None] * x, levels_ptr)
    tl.store(l_ptr + offs, L, mask=live[:, None])
    tl.store(ls_ptr + sb[:, None] * 8 + eight[None, :], l + 32, mask=sb_live[:, None])
    tl.store(d_ptr + sb, d, mask=sb_live)


#: weights a launch takes at most: the codes are int32 and the packers' temporaries a few times that, so a whole
#: embedding (128256 x 8192 = 1.05 G weights) in one launch would hold tens of GB; whole rows a launch
CHUNK_WEIGHTS = 1 << 26


def quantize(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """float32 rows [rows, cols] (cols a multiple of the type's block) -> the bytes of `type_name` [rows, row
    bytes]: codes and scales from the kernels, packed by the reference's packers, CHUNK_WEIGHTS at a time.
    `imatrix` [cols] or None."""
    rows, cols = x.shape
    x = x.contiguous()
    qw = None if imatrix is None else imatrix.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty((rows, cols // R.BLOCK_SIZE[type_name] * R.BLOCK_BYTES[type_name]), dtype=torch.uint8,
                      device=x.device)
    step = max(1, CHUNK_WEIGHTS // cols)
    for a in range(0, rows, step):
        out[a:a + step] = _quantize_rows(x[a:a + step], type_name, qw)
    return out


def _quantize_rows(x: torch.Tensor, type_name: str, qw: torch.Tensor | None) -> torch.Tensor:
    """One launch of `type_name`'s kernel over contiguous rows x, and the packing."""
    rows, cols = x.shape
    dev = x.device
    has_qw = qw is not None
    if not has_qw:
        qw = x  # a pointer the kernel never reads
    n = x.numel() // R.BLOCK_SIZE[type_name]
    codes = torch.empty(x.numel(), dtype=torch.int32, device=dev)
    d = torch.empty(n, dtype=torch.float32, device=dev)
    launch = dict(num_warps=4, enable_fp_fusion=False)
    # super-blocks a program: 4 on a GPU (a handful of [64, 16] float32 tiles live at once stays in registers);
    # the interpreter's cost is per operation, not per element, so there one program takes 32
    sb = 32 if interpreting() else 4
    if type_name in ("Q6_K", "Q3_K"):
        scales = torch.empty((n, 16), dtype=torch.int32, device=dev)
        kernel = q6_k_kernel if type_name == "Q6_K" else q3_k_kernel
        kernel[(triton.cdiv(n, sb),)](x, qw, codes, scales, d, n, cols, HAS_QW=has_qw, SB=sb, **launch)
        pack = R.pack_q6_k if type_name == "Q6_K" else R.pack_q3_k
        out = pack(codes.reshape(n, 256), scales, d)
    else:
        levels = torch.tensor(R.IQ4_LEVELS, dtype=torch.float32, device=dev)
        if type_name == "IQ4_NL":
            b = 8 * sb  # 32-weight blocks: as many weights a program as the super-block types
            iq4_nl_kernel[(triton.cdiv(n, b),)](x, qw, levels, codes, d, n, cols, HAS_QW=has_qw, B=b, **launch)
            out = R.pack_iq4_nl(d, codes.reshape(n, 32))
        else:
            scales = torch.empty((n, 8), dtype=torch.int32, device=dev)
            iq4_xs_kernel[(triton.cdiv(n, sb),)](x, qw, levels, codes, scales, d, n, cols, HAS_QW=has_qw, SB=sb,
                                                 **launch)
            out = R.pack_iq4_xs(d, scales, codes.reshape(n, 256))
    return out.reshape(rows, -1).contiguous()
