"""GPTQ kernels against their torch references, and the fast GPTQ driver against the paper's Algorithm 1.

Triton runs in the interpreter on the CPU (tests/kernels/conftest.py), so Triton cases use small shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from qaas.kernels import gptq as K
from qaas.kernels.gptq_reference import unpack_rows_reference
from support.gptq_paper import fasterquant_reference, layer_error
from qaas.worker.engine.gptq_algorithm import gptq_quantize


def _problem(rows: int, cols: int, seed: int, dead: int | None = None):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 2
    if dead is not None:
        X[:, dead] = 0
    return W, 2 * X.t() @ X / X.shape[0]


GRID = list(itertools.product([2, 3, 4, 8], [-1, 32, 128], [False, True], [True, False]))


@pytest.mark.parametrize("bits,group_size,desc_act,sym", GRID)
def test_torch_fast_path_matches_algorithm1(bits, group_size, desc_act, sym):
    W, H = _problem(40, 320, seed=bits * 100 + group_size, dead=7)
    ref = fasterquant_reference(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                        act_group_aware=False, backend="torch")
    e_ref, e_fast = layer_error(W, ref["Q_stored"], H), layer_error(W, res.Q, H)
    assert abs(e_fast / e_ref - 1) < 0.01
    # The codes reproduce the weights through the per-group tensors the export stores.
    g = res.g_idx.long()
    assert torch.equal(res.scales[g].t() * (res.codes - res.zeros[g].t()), res.Q)


# Every bits / group / act-order / sym value at least once, through the Triton kernels.
TRITON_CASES = [(2, 32, False, True), (3, 128, True, False), (4, -1, True, True), (8, 32, False, False),
                (4, 128, False, True), (3, -1, False, True), (2, 128, True, False), (8, -1, True, True)]


@pytest.mark.parametrize("bits,group_size,desc_act,sym", TRITON_CASES)
def test_triton_path_matches_algorithm1(bits, group_size, desc_act, sym):
    W, H = _problem(16, 160, seed=bits + group_size)  # 160 = one block of 128 + a partial block
    ref = fasterquant_reference(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
    res = gptq_quantize(W, H, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act,
                        act_group_aware=False, backend="triton")
    e_ref, e_fast = layer_error(W, ref["Q_stored"], H), layer_error(W, res.Q, H)
    assert abs(e_fast / e_ref - 1) < 0.01
    # quantized with float32 scales, stored (and written back) with float16 ones, as on the torch path
    assert torch.equal(res.scales, res.scales.half().float())
    g = res.g_idx.long()
    assert torch.equal(res.scales[g].t() * (res.codes - res.zeros[g].t()), res.Q)


def test_static_groups_and_gar_run_and_stay_close():
    W, H = _problem(24, 256, seed=3)
    base = layer_error(W, fasterquant_reference(W, H, bits=4, group_size=32)["Q_stored"], H)
    for kw in ({"static_groups": True}, {"act_group_aware": True}, {"static_groups": True, "desc_act": True}):
        res = gptq_quantize(W, H, bits=4, group_size=32, backend="torch", **kw)
        assert layer_error(W, res.Q, H) < 1.5 * base
        g = res.g_idx.long()
        assert torch.equal(res.scales[g].t() * (res.codes - res.zeros[g].t()), res.Q)
    ref = fasterquant_reference(W, H, bits=4, group_size=32, static_groups=True, desc_act=True)
    res = gptq_quantize(W, H, bits=4, group_size=32, static_groups=True, desc_act=True, backend="torch")
    assert torch.equal(ref["codes"], res.codes)


def test_dead_inputs_and_non_pd_hessian_do_not_crash():
    W, H = _problem(8, 64, seed=1, dead=3)
    H[:, 10] = H[10, :] = 0  # another dead input
    res = gptq_quantize(W, H, bits=4, group_size=32, backend="torch")
    assert res.dead_columns == 2 and torch.isfinite(res.Q).all()
    indefinite = torch.diag(torch.linspace(1.0, 2.0, 64))
    indefinite[5, 6] = indefinite[6, 5] = 10.0  # not PSD
    notes = []
    res = gptq_quantize(W, indefinite, bits=4, group_size=32, damp_percent=0.01, backend="torch", log=notes.append)
    assert notes and res.damp_percent > 0.01 and res.retries == notes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_group_params_pack_dequant_triton_match_torch(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 96, generator=g)
    for sym, round_scale in itertools.product((True, False), (True, False)):
        s1, z1 = K.group_params(w, bits, sym, 32, round_scale=round_scale, backend="torch")
        s2, z2 = K.group_params(w, bits, sym, 32, round_scale=round_scale, backend="triton")
        assert torch.equal(s1, s2) and torch.equal(z1, z2)
        assert torch.equal(s1, s1.half().float()) == round_scale
    codes = torch.randint(0, 2**bits, (64, 48), generator=g, dtype=torch.int32)
    p1 = K.pack_rows(codes, bits, backend="torch")
    p2 = K.pack_rows(codes, bits, backend="triton")
    assert p1.dtype == torch.int32 and p1.shape == (64 * bits // 32, 48)
    assert torch.equal(p1, p2)
    assert torch.equal(unpack_rows_reference(p1, bits), codes)
    zeros = torch.randint(0, 2**bits, (3, 64), generator=g, dtype=torch.int32)
    qz = K.pack_qzeros(zeros, bits)
    scales = torch.rand(3, 64, generator=g).half()
    gi = torch.randint(0, 3, (64,), generator=g, dtype=torch.int32)
    qw = K.pack_qweight(torch.randint(0, 2**bits, (64, 64), generator=g, dtype=torch.int32), bits)
    for v1 in (True, False):
        d1 = K.dequantize(qw, qz, scales, gi, bits, v1=v1, backend="torch")
        d2 = K.dequantize(qw, qz, scales, gi, bits, v1=v1, backend="triton")
        assert torch.equal(d1, d2)


def test_block_kernel_matches_reference_exactly():
    g = torch.Generator().manual_seed(0)
    W, H = _problem(16, 96, seed=5)
    L = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + 0.1 * torch.eye(96))), upper=True)
    s, z = K.group_params(W, 4, False, 32, backend="torch")
    cg = torch.arange(96) // 32
    a = K.gptq_block(W.clone(), L, s, z, cg, 15, backend="torch")
    b = K.gptq_block(W.clone(), L, s, z, cg, 15, backend="triton")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
