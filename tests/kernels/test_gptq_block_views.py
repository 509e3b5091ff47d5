"""The GPTQ block kernel on column slices of the layer's matrices (what the driver passes since it stopped
copying per block): reading W's and Hinv's block in place and writing into slices of the full Q / error /
code matrices gives what the plain call on contiguous copies gives, on both backends; bad `out` is refused."""

from __future__ import annotations

import pytest
import torch

from qaas.kernels import gptq as K


def _setup(rows=16, cols=200, i1=64, b=96, seed=7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g)
    H = X.t() @ X / X.shape[0] + 0.1 * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    s, z = K.group_params(W[:, i1 : i1 + b], 4, True, 32, backend="torch")
    cg = (torch.arange(b) // 32).to(torch.int32)
    return W, U, s, z, cg, i1, b


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slices_in_and_out_equal_contiguous_call(backend):
    W, U, s, z, cg, i1, b = _setup()
    i2 = i1 + b
    want = K.gptq_block(W[:, i1:i2].clone(), U[i1:i2, i1:i2].contiguous(), s, z, cg, 15, backend=backend)
    Q = torch.full_like(W, float("nan"))
    E = torch.full_like(W, float("nan"))
    C = torch.full(W.shape, -1, dtype=torch.int32)
    got = K.gptq_block(W.clone()[:, i1:i2], U[i1:i2, i1:i2], s, z, cg, 15, backend=backend,
                       out=(Q[:, i1:i2], E[:, i1:i2], C[:, i1:i2]))
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    # exactly the block's columns were written
    assert torch.isnan(Q[:, :i1]).all() and torch.isnan(Q[:, i2:]).all() and not torch.isnan(Q[:, i1:i2]).any()
    assert (C[:, :i1] == -1).all() and (C[:, i2:] == -1).all() and (C[:, i1:i2] >= 0).all()


def test_bad_out_is_refused():
    W, U, s, z, cg, i1, b = _setup()
    w1 = W[:, i1 : i1 + b].clone()
    ok = (torch.empty(16, b), torch.empty(16, b), torch.empty(16, b, dtype=torch.int32))
    for bad in [(ok[0], ok[1], ok[2].float()), (ok[0].t().contiguous().t(), ok[1], ok[2]),
                (torch.empty(16, b + 1)[:, :b], ok[1], ok[2]), (ok[0][:8], ok[1], ok[2])]:
        with pytest.raises(ValueError):
            K.gptq_block(w1, U[i1 : i1 + b, i1 : i1 + b], s, z, cg, 15, out=bad, backend="torch")
