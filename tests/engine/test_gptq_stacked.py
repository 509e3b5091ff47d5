"""Layers that share a Hessian quantized in one column loop (`gptq_quantize_stacked`): each layer's result is the
one a separate `gptq_quantize` gives it (GPTQ treats every output row on its own given H), for act-order,
group-aware reordering, static groups, asymmetric and ungrouped configs, with dead input channels."""

from __future__ import annotations

import pytest
import torch

from qaas.worker.engine.gptq_algorithm import gptq_quantize, gptq_quantize_stacked, hessian_factor


def _layers(seed):
    g = torch.Generator().manual_seed(seed)
    C = 256
    X = torch.randn(2048, C, generator=g) * torch.linspace(0.1, 3, C)
    X[:, 7] = 0  # a dead input channel
    H = 2 / X.shape[0] * X.t() @ X
    Ws = [torch.randn(rows, C, generator=g) * 0.05 for rows in (96, 32, 64)]
    return Ws, H


@pytest.mark.parametrize("config", [
    dict(bits=4, group_size=64, sym=True, desc_act=False, act_group_aware=False, static_groups=False),
    dict(bits=3, group_size=64, sym=False, desc_act=True, act_group_aware=False, static_groups=False),
    dict(bits=4, group_size=32, sym=True, desc_act=False, act_group_aware=True, static_groups=False),
    dict(bits=4, group_size=64, sym=False, desc_act=True, act_group_aware=False, static_groups=True),
    dict(bits=8, group_size=-1, sym=True, desc_act=False, act_group_aware=False, static_groups=False),
])
def test_stacked_layers_get_their_own_results(config):
    Ws, H = _layers(0)
    factor = hessian_factor(H, group_size=config["group_size"], damp_percent=0.01, desc_act=config["desc_act"],
                            act_group_aware=config["act_group_aware"])
    opts = dict(config, damp_percent=0.01, factor=factor, blocksize=32)  # 8 loop steps over 256 columns
    stacked = gptq_quantize_stacked([w.clone() for w in Ws], H, **opts)
    assert len(stacked) == len(Ws)
    for W, got in zip(Ws, stacked):
        ref = gptq_quantize(W, H, **opts)
        assert got.Q.shape == W.shape and got.scales.shape == ref.scales.shape
        assert (got.codes == ref.codes).float().mean() > 0.999  # a rare tie may round the other way
        torch.testing.assert_close(got.scales, ref.scales, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.zeros, ref.zeros)
        assert torch.equal(got.g_idx, ref.g_idx) and got.dead_columns == ref.dead_columns == 1
        torch.testing.assert_close(got.Q, ref.Q, rtol=1e-4, atol=1e-4)
        assert got.loss == pytest.approx(ref.loss, rel=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(Ws, _layers(0)[0]))  # the inputs are not modified
