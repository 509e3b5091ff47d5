"""GPTQ kernels: group scale/zero, the fused per-block column loop, v1 packing, dequantization.

The launchers: each public function checks its arguments, then runs the Triton kernel
(`gptq_triton.py`, with the grid picked here) or the torch reference it is tested against
(`gptq_reference.py`), by the one rule of `qaas.kernels.dispatch.use_triton`. The conventions (weight
orientation, rounding, the packed bit stream) are written down in `gptq_reference.py`.
"""

from __future__ import annotations

import torch
import triton

from . import gptq_triton as T
from .dispatch import use_triton
from .gptq_reference import (
    SUPPORTED_BITS,
    dequantize_reference,
    gptq_block_reference,
    group_params_reference,
    pack_rows_reference,
)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")


def group_params(
    w: torch.Tensor, bits: int, sym: bool, group_size: int, *, round_scale: bool = True, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row over consecutive groups of `group_size` columns.

    `w` is `[R, NG * group_size]` (the caller slices whole groups); returns `[R, NG]` float32 tensors.
    """
    R, C = w.shape
    if C % group_size:
        raise ValueError(f"{C} columns are not whole groups of {group_size}")
    if not use_triton(backend, w):
        return group_params_reference(w, bits, sym, group_size, round_scale=round_scale)
    ng = C // group_size
    w = w.contiguous()
    s = torch.empty((R, ng), dtype=torch.float32, device=w.device)
    z = torch.empty_like(s)
    block_g = triton.next_power_of_2(group_size)
    block_r = max(1, min(64, 4096 // block_g))
    grid = (triton.cdiv(R, block_r), ng)
    T.group_params_kernel[grid](
        w, s, z, R, ng, group_size, w.stride(0), s.stride(0), 2**bits - 1,
        SYM=sym, ROUND=round_scale, BLOCK_R=block_r, BLOCK_G=block_g,
    )
    return s, z


def gptq_block(
    w1: torch.Tensor,
    hinv1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    col_group: torch.Tensor,
    maxq: int,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `gptq_block_reference`; Triton does the whole block in one launch.

    `w1` and `hinv1` may be column slices of larger row-major matrices (rows strided, columns contiguous):
    the kernel reads them in place. `out`: (dequantized, errors, codes) to write, e.g. column slices of the
    layer's full [R, C] results (float32, float32, int32, one common row stride); returned as given. The
    GPTQ driver calls this once per 128 columns, so every copy and allocation saved here is a launch saved
    per block. The torch reference may overwrite `w1` (it is the working copy of those columns)."""
    R, B = w1.shape
    if hinv1.shape != (B, B) or col_group.numel() != B or scale.shape != zero.shape or scale.shape[0] != R:
        raise ValueError(f"gptq_block: w1 {tuple(w1.shape)}, hinv1 {tuple(hinv1.shape)}, scale "
                         f"{tuple(scale.shape)}, zero {tuple(zero.shape)}, col_group {tuple(col_group.shape)}")
    if out is not None:
        q1, err1, codes = out
        if (q1.shape != (R, B) or err1.shape != (R, B) or codes.shape != (R, B) or q1.dtype != torch.float32
                or err1.dtype != torch.float32 or codes.dtype != torch.int32
                or not (q1.stride(1) == err1.stride(1) == codes.stride(1) == 1)
                or not (q1.stride(0) == err1.stride(0) == codes.stride(0))):
            raise ValueError("gptq_block: out must be three [R, B] tensors (float32, float32, int32) with "
                             "contiguous rows and one row stride")
    if not use_triton(backend, w1):
        res = gptq_block_reference(w1, hinv1, scale, zero, col_group, maxq)
        if out is None:
            return res
        for dst, src in zip(out, res):
            dst.copy_(src)
        return out
    if w1.stride(1) != 1:
        w1 = w1.contiguous()
    if hinv1.stride(1) != 1:
        hinv1 = hinv1.contiguous()
    scale = scale.contiguous()
    zero = zero.contiguous()
    col_group = col_group.to(device=w1.device, dtype=torch.int32).contiguous()
    if out is None:
        q1 = torch.empty((R, B), dtype=torch.float32, device=w1.device)
        err1 = torch.empty_like(q1)
        codes = torch.empty((R, B), dtype=torch.int32, device=w1.device)
    block_c = max(16, triton.next_power_of_2(B))
    block_r = 16 if block_c <= 128 else 8
    grid = (triton.cdiv(R, block_r),)
    T.gptq_block_kernel[grid](
        w1, hinv1, scale, zero, col_group, q1, err1, codes,
        R, w1.stride(0), hinv1.stride(0), scale.stride(0), q1.stride(0), maxq,
        NCOL=B, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )
    return q1, err1, codes


def pack_rows(codes: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    """Pack `[K, N]` codes along dim 0 into `[K * bits / 32, N]` int32 (K a multiple of 32)."""
    _check_bits(bits)
    K, N = codes.shape
    if K % 32:
        raise ValueError(f"cannot pack {K} values along the packed dimension: not a multiple of 32")
    if not use_triton(backend, codes):
        return pack_rows_reference(codes, bits)
    codes = codes.to(torch.int32).contiguous()
    out = torch.empty((K // 32 * bits, N), dtype=torch.int32, device=codes.device)
    block_n = min(128, triton.next_power_of_2(max(N, 16)))
    grid = (K // 32, triton.cdiv(N, block_n))
    T.pack_kernel[grid](codes, out, N, codes.stride(0), out.stride(0), BITS=bits, BLOCK_N=block_n)
    return out


def pack_qweight(codes_in_out: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    """`[in, out]` codes → qweight `[in * bits / 32, out]`."""
    return pack_rows(codes_in_out, bits, backend=backend)


def pack_qzeros(stored_zeros: torch.Tensor, bits: int, *, backend: str = "auto") -> torch.Tensor:
    """`[G, out]` stored zero fields (already minus one for v1, masked) → qzeros `[G, out * bits / 32]`."""
    return pack_rows(stored_zeros.t().contiguous(), bits, backend=backend).t().contiguous()


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
    _check_bits(bits)
    K = qweight.shape[0] * 32 // bits
    N = qweight.shape[1]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight and qzeros must be int32, not {qweight.dtype} and {qzeros.dtype}")
    if g_idx.numel() != K or scales.shape[1] != N or qzeros.shape != (scales.shape[0], N * bits // 32):
        raise ValueError(f"dequantize: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)}, g_idx {tuple(g_idx.shape)} do not describe one {bits}-bit layer")
    if not use_triton(backend, qweight):
        return dequantize_reference(qweight, qzeros, scales, g_idx, bits, v1=v1, dtype=dtype)
    qweight = qweight.contiguous()
    qzeros = qzeros.contiguous()
    scales = scales.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    out = torch.empty((N, K), dtype=dtype, device=qweight.device)
    bk, bn = 32, 64
    grid = (triton.cdiv(K, bk), triton.cdiv(N, bn))
    T.dequant_kernel[grid](
        qweight, qzeros, scales, g_idx, out, K, N,
        qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, V1=v1, BLOCK_K=bk, BLOCK_N=bn,
    )
    return out
