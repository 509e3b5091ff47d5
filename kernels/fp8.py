"""FP8 (e4m3fn) weight quantization with one scale per tile, byte-exact with compressed-tensors' torch path.

What llm-compressor computes for its FP8 schemes when it rounds to nearest (`fp8_reference.py` has the
arithmetic): a scale per tile (the whole tensor, one row, or a 128 x 128 block) = absmax / 448 in the weight's
dtype, codes = e4m3(clamp(w / scale)) with the quotient rounded to the weight's dtype first. compressed-tensors'
own Triton path (taken on SM90+ GPUs) divides in float32 without that intermediate rounding and so can land one
e4m3 step away on a few elements; these kernels keep the torch path's bytes on every device, so that a
checkpoint does not depend on the GPU that made it.

This module is the launcher: `tile_scales` (torch reductions, the same on every backend), `quantize_fp8` and
`dequantize_fp8` (the Triton kernels of `fp8_triton.py`, or the torch references of `fp8_reference.py`, by the
rule of `qaas.kernels.dispatch.use_triton`).
"""

from __future__ import annotations

import torch
import triton

from . import fp8_reference as R
from . import fp8_triton as T
from .dispatch import use_triton

FP8_MAX = R.FP8_MAX
_FLOAT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BLOCK_R, _BLOCK_C = 32, 128


def _tile(tile: tuple[int, int] | None, shape: tuple[int, int]) -> tuple[int, int]:
    """`None` means one tile for the whole tensor (strategy "tensor")."""
    if tile is None:
        return (max(shape[0], 1), max(shape[1], 1))
    th, tw = int(tile[0]), int(tile[1])
    if th < 1 or tw < 1:
        raise ValueError(f"tile sizes must be positive, got {tile}")
    return th, tw


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError("w must be a 2-D tensor [out, in]")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("w must be contiguous (call .contiguous() first)")
    if w.numel() == 0:
        raise ValueError("w must have at least one element")


def _check_scale(scale: torch.Tensor, shape: tuple[int, int], tile: tuple[int, int]) -> None:
    want = (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    if scale.dim() != 2 or tuple(scale.shape) != want:
        raise ValueError(f"scale must be {list(want)} for a {list(shape)} weight in tiles of {list(tile)}, "
                         f"got {list(scale.shape)}")
    if scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")


def tile_scales(w: torch.Tensor, tile: tuple[int, int] | None) -> torch.Tensor:
    """compressed-tensors' symmetric FP8 scale of each tile, in w's dtype: `[ceil(R/th), ceil(C/tw)]`."""
    _check_weight(w)
    t = _tile(tile, tuple(w.shape))
    return R.scales_from_absmax(R.tile_absmax_reference(w, t))


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int] | None, *,
                 backend: str = "auto") -> torch.Tensor:
    """e4m3fn codes of `w` `[out, in]` with the per-tile `scale` (see `tile_scales`)."""
    _check_weight(w)
    shape = tuple(w.shape)
    t = _tile(tile, shape)
    _check_scale(scale, shape, t)
    if not use_triton(backend, w, scale):
        return R.quantize_fp8_reference(w, scale, t)
    rows, cols = shape
    s = scale.to(w.dtype).contiguous()
    q = torch.empty(shape, dtype=torch.uint8, device=w.device)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(cols, _BLOCK_C))
    T.fp8_quant_kernel[grid](w, s, q, rows, cols, s.shape[1], t[0], t[1], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C,
                             SRC=_FLOAT_DTYPES[w.dtype], enable_fp_fusion=False)
    return q.view(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int] | None,
                   dtype: torch.dtype = torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """code * scale (in the scale's dtype, as compressed-tensors' `dequantize`), as `dtype`."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise ValueError(f"q must be a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    shape = tuple(q.shape)
    t = _tile(tile, shape)
    _check_scale(scale, shape, t)
    if not use_triton(backend, q, scale):
        return R.dequantize_fp8_reference(q, scale, t, dtype)
    rows, cols = shape
    s = scale.contiguous()
    out = torch.empty(shape, dtype=dtype, device=q.device)
    grid = (triton.cdiv(rows, _BLOCK_R), triton.cdiv(cols, _BLOCK_C))
    T.fp8_dequant_kernel[grid](q.contiguous().view(torch.uint8), s, out, rows, cols, s.shape[1], t[0], t[1],
                               BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, SCALE_ROUND=_FLOAT_DTYPES[s.dtype],
                               enable_fp_fusion=False)
    return out
