"""The Hessian accumulator keeps X^T X in tiles and computes only those on and above the diagonal: the
assembled sum equals the float64 X^T X over all the batches added, is exactly symmetric, and H = 2/n X^T X."""

from __future__ import annotations

import pytest
import torch

from qaas.worker.engine.hessian import HessianAccumulator, hessian_tile


@pytest.mark.parametrize("n,tile", [(96, 32), (100, 32), (64, None), (50, 64)])
def test_tiles_assemble_the_full_symmetric_sum(n, tile):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(3, 17, n, generator=g) * torch.rand(n, generator=g) for _ in range(3)]
    acc = HessianAccumulator(n, "cpu", tile=tile)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, n) for x in xs]).double()
    H = acc.finalize()
    assert acc.n == X.shape[0] and H.dtype == torch.float32 and H.shape == (n, n)
    assert torch.equal(H, H.t())
    torch.testing.assert_close(H.double(), 2 * X.t() @ X / X.shape[0], rtol=1e-5, atol=1e-5)


def test_tile_sizes_at_the_llama_widths():
    assert hessian_tile(2048) == 2048
    assert [len(HessianAccumulator(n, "meta").bounds) for n in (4096, 14336, 8192, 28672)] == [2, 7, 4, 7]


def test_no_tokens_gives_zeros():
    assert torch.equal(HessianAccumulator(40, "cpu", tile=16).finalize(), torch.zeros(40, 40))
