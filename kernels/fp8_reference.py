"""Plain-torch references of the FP8 kernels (`qaas.kernels.fp8`): what the Triton kernels are tested against,
and what runs for tensors off CUDA.

The arithmetic is compressed-tensors' (0.20) torch path, step for step, in the weight's own dtype:
  * scale of a tile = max(|min(w, 0)|, |max(w, 0)|) / (896 / 2), computed in w's dtype (so rounded to it),
    a zero scale replaced by that dtype's eps (`calculate_qparams`);
  * code = e4m3(clamp(w / scale + 0, -448, 448)), where `w / scale` is rounded to w's dtype before the
    conversion to e4m3 (round to nearest even) (`_quantize`: the division happens on tensors of that dtype);
  * dequantization: code (as the scale's dtype) * scale.
A "tile" is `rows x cols` elements sharing one scale: the whole tensor (strategy tensor), one row (channel),
a 128 x 128 block (block); the scale tensor is `[ceil(R / rows), ceil(C / cols)]`.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def tile_absmax_reference(w: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """max |w| over each tile (partial tiles at the edges), in w's dtype: `[ceil(R/th), ceil(C/tw)]`."""
    R, C = w.shape
    th, tw = tile
    nr, nc = -(-R // th), -(-C // tw)
    padded = torch.zeros((nr * th, nc * tw), dtype=w.dtype, device=w.device)
    padded[:R, :C] = w.abs()
    return padded.view(nr, th, nc, tw).amax(dim=(1, 3))


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' symmetric FP8 scale: absmax / 448 in absmax's dtype, zeros replaced by its eps."""
    half_range = torch.tensor(2 * FP8_MAX, dtype=absmax.dtype, device=absmax.device) / 2
    s = absmax / half_range
    eps = torch.tensor(torch.finfo(absmax.dtype).eps, dtype=absmax.dtype, device=absmax.device)
    return torch.where(s == 0, eps, s)


def expand_tiles(scale: torch.Tensor, shape: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """The per-tile tensor `scale` repeated to one value per element of a `shape` tensor."""
    R, C = shape
    return scale.repeat_interleave(tile[0], dim=0)[:R].repeat_interleave(tile[1], dim=1)[:, :C]


def quantize_fp8_reference(w: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    s = expand_tiles(scale.to(w.dtype), tuple(w.shape), tile)
    # + 0: compressed-tensors adds the symmetric (zero) zero point, which turns a quotient of -0.0 into +0.0
    return torch.clamp(w / s + 0.0, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8_reference(q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int],
                             dtype: torch.dtype) -> torch.Tensor:
    s = expand_tiles(scale, tuple(q.shape), tile)
    return (q.to(scale.dtype) * s).to(dtype)
