"""GPTQ kernels: group scale/zero, the fused per-block column loop, v1 packing, dequantization.

Each Triton kernel sits beside a plain-torch reference of the same function. Public functions take
`backend="auto" | "triton" | "torch"`: "auto" runs Triton on CUDA tensors and the reference otherwise,
so CPU tests can force Triton under `TRITON_INTERPRET=1`.

Conventions (GPTQ paper / FORMATS.md §1):
  * a weight is `[rows=out_features, cols=in_features]`; GPTQ walks the columns (input channels);
  * `q = clamp(round_half_even(w / scale) + zero, 0, maxq)`, `w_hat = scale * (q - zero)`;
  * scales are rounded to float16 before use (`round_scale=True`) so that the float16 scales stored in the
    checkpoint reproduce the quantizer's weights bit for bit;
  * packing is a little-endian bit stream: value j of a run of 32 sits at stream bit `bits * j`, stream
    bit b lives in word `b // 32` at bit `b % 32` (for 2/4/8 bits that is "value j at bit bits*j"; for 3 bits
    it is exactly FORMATS.md's three-word layout).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional at import time: the torch references work without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    _HAS_TRITON = False

SUPPORTED_BITS = (2, 3, 4, 8)


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not _HAS_TRITON:
            raise RuntimeError("backend='triton' asked for but triton is not importable")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    if not _HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return False


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Scale / zero of a group of columns
# ----------------------------------------------------------------------------------------------


def find_params_reference(
    x: torch.Tensor, bits: int, sym: bool, *, round_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero over the last dimension of `x` (`[..., n]`), as the GPTQ quantizer does.

    The range always contains 0; an all-zero row gets the range [-1, 1]. Returns float32 tensors
    of shape `x.shape[:-1]`.
    """
    maxq = 2**bits - 1
    x = x.float()
    xmin = torch.clamp(x.amin(dim=-1), max=0.0)
    xmax = torch.clamp(x.amax(dim=-1), min=0.0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if round_scale:
        # Round to the storage dtype, never to zero or infinity.
        scale = scale.clamp(min=2.0**-24, max=65504.0).half().float()
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_reference(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values; `scale`/`zero` broadcast against `x`."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


if _HAS_TRITON:

    @triton.jit
    def _round_half_even(x):
        # torch.round semantics without libdevice (which the interpreter lacks).
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _group_params_kernel(
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


def group_params(
    w: torch.Tensor, bits: int, sym: bool, group_size: int, *, round_scale: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row over consecutive groups of `group_size` columns.

    `w` is `[R, NG * group_size]` (the caller slices whole groups); returns `[R, NG]` float32 tensors.
    """
    R, C = w.shape
    if C % group_size:
        raise ValueError(f"{C} columns are not whole groups of {group_size}")
    ng = C // group_size
    if not _use_triton(backend, w):
        return find_params_reference(w.reshape(R, ng, group_size), bits, sym, round_scale=round_scale)
    w = w.contiguous()
    s = torch.empty((R, ng), dtype=torch.float32, device=w.device)
    z = torch.empty_like(s)
    block_g = triton.next_power_of_2(group_size)
    block_r = max(1, min(64, 4096 // block_g))
    grid = (triton.cdiv(R, block_r), ng)
    _group_params_kernel[grid](
        w, s, z, R, ng, group_size, w.stride(0), s.stride(0), 2**bits - 1,
        SYM=sym, ROUND=round_scale, BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return s, z


# ----------------------------------------------------------------------------------------------
# The fused per-block column loop
# ----------------------------------------------------------------------------------------------


def gptq_block_reference(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    col_group: torch.Tensor,
    maxq: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One lazy-batch block of GPTQ, column by column (Algorithm 1's inner loop).

    w1: `[R, B]` float32 (modified in place), hinv1: `[B, B]` upper Cholesky factor of the inverse Hessian
    block, scale/zero: `[R, NG]`, col_group: `[B]` index into scale/zero for each column.
    Returns (dequantized `[R, B]`, scaled errors `[R, B]`, codes `[R, B]` int32).
    """
    R, B = w1.shape
    q1 = torch.empty_like(w1)
    err1 = torch.empty_like(w1)
    codes = torch.empty((R, B), dtype=torch.int32, device=w1.device)
    cg = col_group.tolist()
    for i in range(B):
        w = w1[:, i]
        d = hinv1[i, i]
        c, q = quantize_reference(w, scale[:, cg[i]], zero[:, cg[i]], maxq)
        e = (w - q) / d
        w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
        q1[:, i] = q
        err1[:, i] = e
        codes[:, i] = c.to(torch.int32)
    return q1, err1, codes


if _HAS_TRITON:

    @triton.jit
    def _gptq_block_kernel(
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


def gptq_block(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    col_group: torch.Tensor,
    maxq: int,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `gptq_block_reference`; Triton does the whole block in one launch."""
    if not _use_triton(backend, w1):
        return gptq_block_reference(w1, hinv1, scale, zero, col_group, maxq)
    R, B = w1.shape
    w1 = w1.contiguous()
    hinv1 = hinv1.contiguous()
    scale = scale.contiguous()
    zero = zero.contiguous()
    col_group = col_group.to(device=w1.device, dtype=torch.int32).contiguous()
    q1 = torch.empty((R, B), dtype=torch.float32, device=w1.device)
    err1 = torch.empty_like(q1)
    codes = torch.empty((R, B), dtype=torch.int32, device=w1.device)
    block_c = max(16, triton.next_power_of_2(B))
    block_r = 16 if block_c <= 128 else 8
    grid = (triton.cdiv(R, block_r),)
    _gptq_block_kernel[grid](
        w1, hinv1, scale, zero, col_group, q1, err1, codes,
        R, w1.stride(0), hinv1.stride(0), scale.stride(0), q1.stride(0), maxq,
        NCOL=B, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return q1, err1, codes


# ----------------------------------------------------------------------------------------------
# Packing (v1 layout) and unpacking
# ----------------------------------------------------------------------------------------------


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) → int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[K, N]` codes along dim 0 into `[K * bits / 32, N]` int32 (K a multiple of 32)."""
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"cannot pack {K} values along the packed dimension: not a multiple of 32")
    v = codes.to(torch.int64).reshape(K // 32, 32, N) & (2**bits - 1)
    out = torch.zeros((K // 32, bits, N), dtype=torch.int64, device=codes.device)
    for j in range(32):
        start = bits * j
        k0, off = divmod(start, 32)
        out[:, k0] |= (v[:, j] << off) & 0xFFFFFFFF
        if off + bits > 32:  # spills into the next word (3-bit only)
            out[:, k0 + 1] |= v[:, j] >> (32 - off)
    return _to_int32_bits(out.reshape(K // 32 * bits, N))


def unpack_rows_reference(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows_reference`: `[K * bits / 32, N]` int32 → `[K, N]` int32 codes."""
    W, N = packed.shape
    words = packed.to(torch.int64).reshape(W // bits, bits, N) & 0xFFFFFFFF
    mask = 2**bits - 1
    out = torch.empty((W // bits, 32, N), dtype=torch.int64, device=packed.device)
    for j in range(32):
        k0, off = divmod(bits * j, 32)
        val = words[:, k0] >> off
        if off + bits > 32:
            val = val | (words[:, k0 + 1] << (32 - off))
        out[:, j] = val & mask
    return out.reshape(W // bits * 32, N).to(torch.int32)


if _HAS_TRITON:

    @triton.jit
    def _pack_kernel(Cd, P, N, stride_c, stride_p, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
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


def pack_rows(codes: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    if not _use_triton(backend, codes):
        return pack_rows_reference(codes, bits)
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"cannot pack {K} values along the packed dimension: not a multiple of 32")
    codes = codes.to(torch.int32).contiguous()
    out = torch.empty((K // 32 * bits, N), dtype=torch.int32, device=codes.device)
    block_n = min(128, triton.next_power_of_2(max(N, 16)))
    grid = (K // 32, triton.cdiv(N, block_n))
    _pack_kernel[grid](codes, out, N, codes.stride(0), out.stride(0), BITS=bits, BLOCK_N=block_n)
    return out


def pack_qweight(codes_in_out: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    """`[in, out]` codes → qweight `[in * bits / 32, out]`."""
    return pack_rows(codes_in_out, bits, backend=backend)


def pack_qzeros(stored_zeros: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    """`[G, out]` stored zero fields (already minus one for v1, masked) → qzeros `[G, out * bits / 32]`."""
    return pack_rows(stored_zeros.t().contiguous(), bits, backend=backend).t().contiguous()


# ----------------------------------------------------------------------------------------------
# Dequantization of a v1 / v2 layer
# ----------------------------------------------------------------------------------------------


def dequantize_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    v1: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """qweight/qzeros/scales/g_idx → weight `[out, in]` (`nn.Linear` layout)."""
    mask = 2**bits - 1
    codes = unpack_rows_reference(qweight, bits).to(torch.int64)  # [in, out]
    zeros = unpack_rows_reference(qzeros.t().contiguous(), bits).t().to(torch.int64)  # [G, out]
    if v1:
        zeros = (zeros + 1) & mask
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (codes - zeros[g]).float()
    return w.t().contiguous().to(dtype)


if _HAS_TRITON:

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
    def _dequant_kernel(
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


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    v1: bool = True,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> torch.Tensor:
    """Weight `[out, in]` from a GPTQ layer's tensors (v1: stored zero is zero minus one)."""
    if not _use_triton(backend, qweight):
        return dequantize_reference(qweight, qzeros, scales, g_idx, bits, v1=v1, dtype=dtype)
    K = qweight.shape[0] * 32 // bits
    N = qweight.shape[1]
    qweight = qweight.contiguous()
    qzeros = qzeros.contiguous()
    scales = scales.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    bk, bn = 32, 64
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    _dequant_kernel[grid](
        qweight, qzeros, scales, g_idx, out, K, N,
        qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, V1=v1, BLOCK_K=bk, BLOCK_N=bn,
    )
    return out
