"""The Hessian GPTQ needs per linear layer: H = 2/n * sum over calibration tokens of x x^T.

Accumulated as a float32 sum of X^T X plus a token count, averaged once at the end (the same value as the
paper's running average). On CUDA with half-precision activations the product runs on the fp16/bf16 tensor
cores with float32 output (`torch.addmm(..., out_dtype=torch.float32)`): the product of two fp16 (or bf16)
numbers is exact in float32 and the tensor cores accumulate in float32, so the sum is the one the paper's
float32 matmul computes, up to summation order — at the half-precision rate, twice the TF32 rate of the
float32 path (which stays as the fallback for a torch without `out_dtype`, and for float32 activations).
The sum is kept in tiles, only those on and above the diagonal computed (`hessian_tile`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .ranks import Ranks

_HALF = (torch.float16, torch.bfloat16)
#: whether this torch's CUDA mm takes out_dtype (torch >= 2.8); None until the first CUDA call finds out
_mm_out_dtype: bool | None = None


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """Let float32 CUDA matmuls inside the block run on TF32 tensor cores (the global flag is restored after)."""
    if not enabled:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def add_half_gram(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """acc + a^T b in float32 from half-precision `a`, `b` [tokens, features] on the tensor cores (one GEMM
    whose epilogue reads `acc`), or None where this torch cannot (the caller then takes the float32 path)."""
    global _mm_out_dtype
    if _mm_out_dtype is False:
        return None
    try:
        if acc is None:
            acc = torch.zeros((a.shape[1], b.shape[1]), dtype=torch.float32, device=a.device)
        g = torch.addmm(acc, a.t(), b, out_dtype=torch.float32)
    except torch.cuda.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype overload, or not for these dtypes
        if _mm_out_dtype:  # it worked before: a real error, not a missing capability (and tiles are half-done)
            raise
        _mm_out_dtype = False
        return None
    _mm_out_dtype = True
    return g


def hessian_tile(in_features: int) -> int:
    """Side of the square tiles the sum is kept in: whole below 4096 features; above, only the tiles on and
    above the diagonal are computed (X^T X is symmetric): 3 of 4 tile products at 4096 features (tile 2048),
    28 of 49 at 14336, 28 of 49 at 28672 (tile 4096) -- little over half the flops of the full product, in
    products still large enough for the tensor cores."""
    if in_features < 4096:
        return in_features
    return 2048 if in_features <= 16384 else 4096


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str, tile: int | None = None) -> None:
        self.in_features = in_features
        self.device = torch.device(device)
        t = max(1, tile or hessian_tile(in_features))
        self.bounds = [(i, min(i + t, in_features)) for i in range(0, in_features, t)]
        #: float32 sums of X[:, tile a]^T X[:, tile b] for a <= b
        self.tiles: dict[tuple[int, int], torch.Tensor] = {}
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.device != self.device:
            x = x.to(self.device)
        self.n += x.shape[0]
        half = x.is_cuda and x.dtype in _HALF
        if half:
            x = x.contiguous()
            if self._add_tiles(x, half=True):
                return
        # bf16 has fewer mantissa bits than TF32, fp16 the same: both exact as TF32 operands
        x = x.float()
        with tf32_matmuls(half):
            self._add_tiles(x, half=False)

    def _add_tiles(self, x: torch.Tensor, *, half: bool) -> bool:
        for a, (i0, i1) in enumerate(self.bounds):
            for b in range(a, len(self.bounds)):
                j0, j1 = self.bounds[b]
                acc = self.tiles.get((a, b))
                if half:
                    new = add_half_gram(acc, x[:, i0:i1], x[:, j0:j1])
                    if new is None:
                        return False  # only ever on the first product (the capability is probed once)
                    self.tiles[(a, b)] = new  # the old tile is freed: one extra tile at a time
                else:
                    if acc is None:
                        acc = self.tiles[(a, b)] = torch.zeros((i1 - i0, j1 - j0), dtype=torch.float32,
                                                               device=self.device)
                    acc.addmm_(x[:, i0:i1].t(), x[:, j0:j1])
        return True

    def gram(self) -> torch.Tensor:
        """X^T X (float32, exactly symmetric: the tiles below the diagonal are the transposes of those above);
        the tiles are freed as they are placed."""
        n = self.in_features
        H = torch.zeros((n, n), dtype=torch.float32, device=self.device)
        for (a, b) in sorted(self.tiles):
            t = self.tiles.pop((a, b))
            (i0, i1), (j0, j1) = self.bounds[a], self.bounds[b]
            if a != b:
                H[i0:i1, j0:j1] = t
                H[j0:j1, i0:i1] = t.t()
            else:  # the diagonal tile's lower half from its upper half: symmetric to the last bit
                H[i0:i1, i0:i1] = torch.triu(t) + torch.triu(t, 1).t()
            del t
        return H

    def finalize(self) -> torch.Tensor:
        """H = 2/n X^T X (float32)."""
        H = self.gram()
        if self.n == 0:
            return H
        return H.mul_(2.0 / self.n)


def uses_half_tensor_cores() -> bool | None:
    """Whether the half-precision products ran on the fp16/bf16 tensor cores with float32 output (None: none
    ran yet); False means this torch took the TF32 fallback."""
    return _mm_out_dtype


def sum_over_shards(ranks: "Ranks", shards: int, partial: Callable[[int], dict[str, HessianAccumulator]],
                    ) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X per input class over every calibration shard (`ranks.calibration_shards`), on every rank;
    `partial(shard)` accumulates one shard's inputs (called on the shard's owner only).

    The same bytes for any number of ranks, by design rather than by luck: each shard's X_s^T X_s is summed
    by one rank alone (its own accumulator from zero over that shard's own forward passes: the same
    operations whichever rank runs them), and the shards' sums are added one by one in shard order,
    ((G_0 + G_1) + G_2) + ..., on every rank once the owner has broadcast its shard. Float addition is not
    associative, so an all-reduce (whose order follows the ranks' count and topology), or each rank folding
    its own shards first, would change the last bits with the count of GPUs. The ranks compute a step's
    shards (one each) in parallel, then exchange them; the cost is a broadcast per shard and, on one GPU too,
    the running sum beside the shard's own (two Hessians per class instead of one)."""
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for step in range(0, shards, ranks.world):
        positions = range(step, min(step + ranks.world, shards))
        grams, ns = None, None
        for pos in positions:
            if ranks.owner_of_shard(pos) == ranks.rank:
                accs = partial(pos)
                ns = {k: a.n for k, a in accs.items()}
                grams = {k: a.gram() for k, a in accs.items()}
                del accs
        for pos in positions:
            owner = ranks.owner_of_shard(pos)
            mine = owner == ranks.rank
            shard_n = ranks.broadcast_object(ns if mine else None, src=owner)
            shard_grams = ranks.broadcast_tensors(grams if mine else None, src=owner)
            if mine:
                grams = None
            for k, g in shard_grams.items():
                if k in totals:
                    totals[k].add_(g)
                else:
                    totals[k] = g
                counts[k] = counts.get(k, 0) + shard_n[k]
            del shard_grams
    return {k: (H.mul_(2.0 / counts[k]) if counts[k] else H) for k, H in totals.items()}
