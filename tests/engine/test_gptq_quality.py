"""GPTQ quality, kept from regressing: the fast path against the paper's algorithm with GPTQModel's group-aware
reordering (GAR), the GAR order against GPTQModel's own functions, one layer's codes, scales and weights against
GPTQModel's own GPTQ on the same weight and inputs (tight: the per-layer quality guard), and qaas's perplexity against
GPTQModel's on the same model, calibration tokens and config (a small, fixed-seed version of
bench/gptq_vs_gptqmodel.py).

GPTQModel patches transformers and torch when imported, so it only ever runs in a child process here.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, SHAKESPEARE, STORIES, WIKITEXT
from support.consumers import require
from support.gptq_paper import fasterquant_reference, gar_permutation_reference, layer_error
from qaas.worker.engine.gptq_algorithm import gar_permutation, gptq_quantize

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gptq_vs_gptqmodel.py"


def _problem(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    # uneven channel scales, so that the reorderings matter
    X = torch.randn(4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    return W, 2 * X.t() @ X / X.shape[0]


@pytest.mark.parametrize("cols,group_size", [(256, 32), (320, 128), (200, 64)])  # 200, 320: a partial last group
def test_gar_permutation_keeps_groups_whole_and_matches_the_reference(cols, group_size):
    _, H = _problem(4, cols, seed=cols)
    d = torch.diag(H)
    perm = gar_permutation(d, group_size)
    assert torch.equal(perm, gar_permutation_reference(d, group_size))
    # every group of group_size positions holds one whole original group, so g_idx stays i // group_size
    groups = (perm // group_size).view(-1)[: cols // group_size * group_size].view(-1, group_size)
    assert (groups == groups[:, :1]).all()
    assert sorted(groups[:, 0].tolist()) == list(range(cols // group_size))


@pytest.mark.parametrize("bits,group_size,sym,static", list(itertools.product([3, 4], [32, 128], [True, False],
                                                                               [False, True])))
def test_gar_fast_path_matches_the_reference(bits, group_size, sym, static):
    W, H = _problem(24, 320, seed=bits * 10 + group_size)
    kw = dict(bits=bits, group_size=group_size, sym=sym, act_group_aware=True, static_groups=static)
    ref = fasterquant_reference(W, H, **kw)
    res = gptq_quantize(W, H, backend="torch", **kw)
    assert res.perm is not None and torch.equal(res.perm, ref["perm"])
    e_ref, e_fast = layer_error(W, ref["Q_stored"], H), layer_error(W, res.Q, H)
    assert abs(e_fast / e_ref - 1) < 1e-3
    # GAR leaves every channel in its own group, so inference needs no reordering
    assert torch.equal(res.g_idx, torch.arange(320, dtype=torch.int32) // group_size)
    g = res.g_idx.long()
    assert torch.equal(res.scales[g].t() * (res.codes - res.zeros[g].t()), res.Q)


GPTQMODEL_GAR = r"""
import json, sys, torch
from gptqmodel.quantization.gar import compose_final_perm, compute_global_perm, compute_local_perms, extend_perm_with_tail
out = []
for seed, cols, gs in json.loads(sys.argv[1]):
    d = torch.rand(cols, generator=torch.Generator().manual_seed(seed))
    local, values = compute_local_perms(d, gs, return_values=True)
    perm = compose_final_perm(local, compute_global_perm(d, gs, precomputed_values=values), gs)
    out.append(extend_perm_with_tail(perm, cols).tolist())
print(json.dumps(out))
"""


def test_gar_permutation_is_gptqmodels():
    require("gptqmodel")
    cases = [(1, 256, 32), (2, 1024, 128), (3, 576, 64), (4, 200, 64)]
    r = subprocess.run([sys.executable, "-P", "-c", GPTQMODEL_GAR, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    for (seed, cols, gs), p in zip(cases, theirs):
        d = torch.rand(cols, generator=torch.Generator().manual_seed(seed))
        ours = gar_permutation(d, gs).tolist()
        full = cols // gs * gs
        assert ours[:full] == p[:full], (cols, gs)
        # the partial last group: the same channels, ours sorted by decreasing diagonal like every other group
        assert sorted(ours[full:]) == p[full:]


# ---- one layer against GPTQModel's own GPTQ, same weight and inputs ----------------------------------------------
GPTQMODEL_LAYER = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from gptqmodel import QuantizeConfig
from gptqmodel.quantization.gptq import GPTQ
t = load_file(sys.argv[1])
out = {}
for i, c in enumerate(json.loads(sys.argv[2])):
    lin = torch.nn.Linear(t["W"].shape[1], t["W"].shape[0], bias=False)
    lin.weight.data.copy_(t["W"])
    g = GPTQ(lin, QuantizeConfig(bits=c["bits"], group_size=c["group_size"], sym=c["sym"], desc_act=c["desc_act"],
                                 act_group_aware=c["act_group_aware"], damp_percent=c["damp_percent"]))
    g.quantizer.configure(perchannel=True)  # what GPTQModel's GPTQProcessor does for every layer
    g.add_batch(t["X"], None)
    Q, scale, zero, g_idx, *_ = g.quantize()
    out.update({f"{i}.Q": Q.float().contiguous(), f"{i}.scale": scale.float().contiguous(),
                f"{i}.zero": zero.float().contiguous(), f"{i}.g_idx": g_idx.int().contiguous()})
save_file(out, sys.argv[3])
"""

LAYER_CONFIGS = [dict(bits=b, group_size=g, sym=s, desc_act=o == "act", act_group_aware=o == "gar", damp_percent=0.1)
                 for b, g, s, o in itertools.product([3, 4], [32, 64], [True, False], ["none", "gar", "act"])]


def test_gptq_layer_is_gptqmodels(tmp_path):
    """The same weight and calibration inputs through GPTQModel 7.7's `GPTQ.quantize` and qaas's `gptq_quantize`
    (the fast path the speed work may not change numerically), in every ordering, symmetric and asymmetric: the same
    codes, both quantizing with float32 scales; the same stored scales (float32 rounded to float16, as GPTQModel
    packs them), and qaas's weights are those stored tensors' (what goes back into the block). A change to damping,
    Hessian handling, orderings, group boundaries or the column loop moves codes."""
    require("gptqmodel")
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(7)
    W = torch.randn(96, 256, generator=g)
    X = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 3  # uneven channels: orderings matter
    X[:, 5] = 0  # a dead channel
    H = 2 * X.t().double() @ X.double() / X.shape[0]
    save_file({"W": W, "X": X}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([sys.executable, "-P", "-c", GPTQMODEL_LAYER, str(tmp_path / "in.safetensors"),
                        json.dumps(LAYER_CONFIGS), str(tmp_path / "out.safetensors")], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    for i, c in enumerate(LAYER_CONFIGS):
        ours = gptq_quantize(W, H.float(), backend="torch", **c)
        g_idx = theirs[f"{i}.g_idx"]
        assert torch.equal(ours.g_idx, g_idx), c
        cols = g_idx.long()
        scale, zero = theirs[f"{i}.scale"][:, cols], theirs[f"{i}.zero"][:, cols]  # float32, per column
        codes = torch.round(theirs[f"{i}.Q"] / scale + zero)
        assert torch.equal(ours.codes.float(), codes), c
        assert torch.equal(ours.scales, theirs[f"{i}.scale"].t().half().float()), c
        assert torch.equal(ours.zeros, theirs[f"{i}.zero"].t()), c
        assert torch.equal(ours.Q, (codes - zero) * scale.half().float()), c  # what GPTQModel's checkpoint holds


# ---- perplexity against GPTQModel's, same model, tokens and config ------------------------------------------------
def _bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import gptq_vs_gptqmodel
    finally:
        sys.path.remove(str(BENCH.parent))
    return gptq_vs_gptqmodel


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    """stories260K, 3-bit g32 symmetric with GAR (the defaults, and the configuration where GAR was found to cost
    9 %), damp 0.1, 16 x 256 tokens of tinyshakespeare: qaas and GPTQModel, both checkpoints' WikiText-2 perplexity
    (8 x 256 tokens) through one independent dequantizer. GAR off and the other configurations:
    bench/gptq_vs_gptqmodel.py."""
    require("gptqmodel")
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from qaas.worker.engine.calibration_data import load_calibration
    from qaas.worker.engine.evaluate import load_eval_data, perplexity
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    bench = _bench()
    work = tmp_path_factory.mktemp("gptq_peer")
    opts = EngineOptions(device="cpu", evaluate=False, allowed_roots=(str(ASSETS), str(work)))
    calib = load_calibration(str(SHAKESPEARE), AutoTokenizer.from_pretrained(str(STORIES)), nsamples=16, seqlen=256,
                             seed=0, sources=opts.calibration_sources())
    save_file({"input_ids": calib.input_ids.contiguous()}, str(work / "calib.safetensors"))
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=8)
    ppl: dict[str, float] = {}
    specs = []
    for gar in (True,):
        qc = {"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": True, "act_group_aware": gar,
              "damp_percent": 0.1, "dataset": str(SHAKESPEARE), "nsamples": 16, "model_seqlen": 256, "seed": 0}
        res = quantize({"path": str(STORIES)}, qc, work / f"qaas-{gar}", options=opts)
        assert res["quantization_config"]["meta"]["calibration"]["sha256"] == calib.sha256
        ppl[f"qaas-{gar}"] = perplexity(bench.load_dequantized(str(STORIES), str(work / f"qaas-{gar}")), data,
                                        device="cpu")
        # GPTQModel quantizes the layers qaas does (it cannot pack the 172-wide MLP at 3 bits either)
        specs.append({"bits": 3, "group_size": 32, "sym": True, "desc_act": False, "act_group_aware": gar,
                      "damp_percent": 0.1, "dynamic": res["quantization_config"].get("dynamic") or {},
                      "out": str(work / f"gptqmodel-{gar}")})
    r = subprocess.run([sys.executable, "-P", str(BENCH), "_gptqmodel", "--src", str(STORIES), "--calib",
                        str(work / "calib.safetensors"), "--spec", json.dumps(specs)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    for gar in (True,):
        ppl[f"gptqmodel-{gar}"] = perplexity(bench.load_dequantized(str(STORIES), str(work / f"gptqmodel-{gar}")),
                                             data, device="cpu")
    return ppl


def test_qaas_perplexity_stays_within_a_bound_of_gptqmodels(peer_runs):
    ours, theirs = peer_runs["qaas-True"], peer_runs["gptqmodel-True"]
    # The goal (issue 12): qaas <= GPTQModel + 1 %. Measured here (2026-12-02): qaas 114.71, GPTQModel 116.73 (-1.7 %;
    # 119.84, +2.7 %, while qaas rounded its scales to float16 before quantizing with them).
    assert ours <= theirs * 1.01, peer_runs
