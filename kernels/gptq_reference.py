"""Plain-torch references of the GPTQ kernels (`qaas.kernels.gptq`): what the Triton kernels are tested
against, and what runs for tensors off CUDA.

Conventions (GPTQ paper / FORMATS.md §1):
  * a weight is `[rows=out_features, cols=in_features]`; GPTQ walks the columns (input channels);
  * `q = clamp(round_half_even(w / scale) + zero, 0, maxq)`, `w_hat = scale * (q - zero)`;
  * `round_scale=True` rounds a scale to the float16 the checkpoint stores (`stored_scale`) before it is used, so
    that the stored scales reproduce the quantizer's weights bit for bit (round-to-nearest); GPTQ's column loop uses
    float32 scales (`round_scale=False`, GPTQModel's choice) and rounds them once, when they are stored;
  * packing is a little-endian bit stream: value j of a run of 32 sits at stream bit `bits * j`, stream
    bit b lives in word `b // 32` at bit `b % 32` (for 2/4/8 bits that is "value j at bit bits*j"; for 3 bits
    it is exactly FORMATS.md's three-word layout).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def stored_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`scale` rounded to the dtype a checkpoint stores it in (as float32 values), never to zero or infinity."""
    fi = torch.finfo(dtype)
    return scale.float().clamp(min=fi.smallest_normal * fi.eps, max=fi.max).to(dtype).float()


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
        scale = stored_scale(scale)
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


def group_params_reference(
    w: torch.Tensor, bits: int, sym: bool, group_size: int, *, round_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero `[R, NG]` of each row over consecutive groups of `group_size` columns of `w` `[R, NG * gs]`."""
    R, C = w.shape
    return find_params_reference(w.reshape(R, C // group_size, group_size), bits, sym, round_scale=round_scale)


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


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) → int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[K, N]` codes along dim 0 into `[K * bits / 32, N]` int32 (K a multiple of 32)."""
    K, N = codes.shape
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
