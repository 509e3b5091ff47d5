"""GPTQ end to end on stories260K: algorithm vs reference on real Hessians, the saved format read back by a
dequantizer written here from FORMATS.md §1 alone, the reloaded model's perplexity, calibration data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from support.gptq_paper import fasterquant_reference, layer_error
from qaas.quantization_rules import CalibrationSources
from qaas.worker.engine.calibration_data import load_calibration, resolve_text
from qaas.worker.engine.errors import CalibrationDataError, InvalidConfig
from qaas.worker.engine.evaluate import load_eval_data, perplexity
from qaas.worker.engine.gptq_algorithm import gptq_quantize
from qaas.worker.engine.methods.gptq.format import pack_layer
from qaas.worker.engine.methods.gptq import GPTQMethod
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize

from conftest import ASSETS, SHAKESPEARE, STORIES, WIKITEXT  # one home: QAAS_TEST_ASSETS or ../shared


# ---- an independent v1/v2 reader, from FORMATS.md §1 only ------------------------------------------------
def _fields(words: list[int], bits: int, count: int) -> list[int]:
    """Values of a little-endian bit stream made of 32-bit words (value j at stream bit bits*j)."""
    stream = 0
    for k, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(count)]


def independent_dequantize(qweight, qzeros, scales, g_idx, bits, v1=True):
    qweight, qzeros = qweight.tolist(), qzeros.tolist()
    n_in = len(qweight) * 32 // bits
    n_out = len(qweight[0])
    codes = [[0] * n_out for _ in range(n_in)]
    for run in range(n_in // 32):
        for col in range(n_out):
            vals = _fields([qweight[run * bits + k][col] for k in range(bits)], bits, 32)
            for j, v in enumerate(vals):
                codes[run * 32 + j][col] = v
    zeros = []
    for row in qzeros:
        z = []
        for run in range(n_out // 32):
            z += _fields(row[run * bits : run * bits + bits], bits, 32)
        zeros.append([((v + 1) & ((1 << bits) - 1)) if v1 else v for v in z])
    q = torch.tensor(codes, dtype=torch.float32)
    zt = torch.tensor(zeros, dtype=torch.float32)
    g = g_idx.long()
    return (scales.float()[g] * (q - zt[g])).t()


@pytest.mark.parametrize("bits,desc_act,sym,fmt", [(b, a, s, f) for b, a, s, f in itertools.product(
    [2, 3, 4, 8], [False, True], [True, False], ["gptq"])] + [(4, True, False, "gptq_v2"), (3, False, True, "gptq_v2")])
def test_saved_tensors_reconstruct_the_quantized_weights_exactly(bits, desc_act, sym, fmt):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 96, generator=g)
    X = torch.randn(400, 96, generator=g)
    res = gptq_quantize(W, 2 * X.t() @ X / 400, bits=bits, group_size=32, sym=sym, desc_act=desc_act,
                        act_group_aware=False, backend="torch")
    t = pack_layer(res, fmt=fmt)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (96 * bits // 32, 64)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (3, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (3, 64)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (96,)
    if desc_act:
        assert not torch.equal(t["g_idx"], torch.arange(96, dtype=torch.int32) // 32)
    if sym and bits == 4 and fmt == "gptq":
        assert (t["qzeros"] == 0x77777777).all()
    w = independent_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, v1=(fmt == "gptq"))
    assert torch.equal(w, res.Q)


def test_algorithm_matches_reference_on_stories_hessians():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    H = {}

    def hook(name):
        def f(m, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.t() @ x
        return f

    layers = {"q": model.model.layers[1].self_attn.q_proj, "o": model.model.layers[3].self_attn.o_proj}
    for n, m in layers.items():
        m.register_forward_hook(hook(n))
    ids = torch.randint(3, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for (n, m), bits, gs, act, sym in itertools.product(layers.items(), [2, 3, 4, 8], [-1, 32], [False, True],
                                                          [True, False]):
        Hn = (2 * H[n] / ids.numel()).float()
        W = m.weight.detach()
        ref = fasterquant_reference(W, Hn, bits=bits, group_size=gs, sym=sym, desc_act=act)
        res = gptq_quantize(W, Hn, bits=bits, group_size=gs, sym=sym, desc_act=act, act_group_aware=False)
        assert abs(layer_error(W, res.Q, Hn) / layer_error(W, ref["Q_stored"], Hn) - 1) < 0.01


def test_triangular_inverse_by_column_blocks_equals_one_solve_and_keeps_the_layer_error(monkeypatch):
    """The factor's L^-1 a block of columns at a time (each block solving only the trailing rows) is the one
    solve against the identity up to rounding, with exact zeros above the diagonal; GPTQ with blocks smaller than
    the layer keeps the layer error of one solve."""
    from qaas.worker.engine import gptq_algorithm as ga

    g = torch.Generator().manual_seed(1)
    n = 300
    X = torch.randn(4 * n, n, generator=g) * torch.exp(torch.randn(n, generator=g))
    H = 2 * X.t() @ X / X.shape[0]
    L = torch.linalg.cholesky(H + 0.01 * H.diagonal().mean() * torch.eye(n))
    one_solve = torch.linalg.solve_triangular(L, torch.eye(n), upper=False)
    for block in (1, 37, 128, n, 4096):
        Li = ga.lower_triangular_inverse(L, block=block)
        assert torch.equal(torch.triu(Li, 1), torch.zeros_like(Li))
        assert float((Li - one_solve).norm() / one_solve.norm()) < 1e-5
    W = torch.randn(64, n, generator=g) * 0.02
    solve, solves = torch.linalg.solve_triangular, []
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda *a, **k: solves.append(1) or solve(*a, **k))
    errors = {}
    for block in (4096, 32):
        monkeypatch.setattr(ga, "INVERSE_BLOCK", block)
        solves.clear()
        errors[block] = layer_error(W, gptq_quantize(W, H, bits=4, group_size=32, act_group_aware=False).Q, H)
        assert len(solves) == -(-n // block)  # the factor was made a block at a time
    assert abs(errors[32] / errors[4096] - 1) < 1e-3


def _run(tmp_path, name, qc, evaluate=True):
    opts = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(tmp_path)), evaluate=evaluate,
                         eval_text_path=str(WIKITEXT), eval_max_windows=4, eval_seqlen=256)
    base = {"quant_method": "gptq", "dataset": str(SHAKESPEARE), "nsamples": 8, "model_seqlen": 256}
    return quantize({"path": str(STORIES)}, {**base, **qc}, tmp_path / name, options=opts)


def test_stories_job_saved_model_reloads_with_reported_perplexity(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GPTQConfig

    res = _run(tmp_path, "q4", {"bits": 4, "group_size": 32})
    out = Path(res["out_dir"])
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    assert qc["checkpoint_format"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["meta"]["calibration"]["samples"] == 8 and len(qc["meta"]["calibration"]["sha256"]) == 64
    # layers the format cannot hold (172 = MLP width) stay float and are named for every loader
    assert "model.layers.0.mlp.down_proj" in res["skipped_modules"]
    assert all("mlp" not in m for g in qc["modules_in_block_to_quantize"] for m in g)
    assert any("mlp\\.down_proj" in k for k in qc["dynamic"])
    try:  # transformers accepts the config (its post_init also insists on optimum/gptqmodel being installed)
        GPTQConfig.from_dict(dict(qc))
    except Exception as exc:  # noqa: BLE001
        assert "optimum" in str(exc) or "gptqmodel" in str(exc), exc
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    sd = load_file(str(out / "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert "model.layers.0.self_attn.q_proj.weight" not in sd
    # reload: the original architecture with weights from our own reader of the saved tensors
    model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            if name.endswith(".qweight"):
                m = name[: -len(".qweight")]
                w = independent_dequantize(t, sd[m + ".qzeros"], sd[m + ".scales"], sd[m + ".g_idx"], 4)
                state[m + ".weight"].copy_(w)
            elif name in state:
                state[name].copy_(t.float())
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=4)
    ppl = perplexity(model, data, device="cpu")
    ev = res["evaluation"]
    assert ppl == pytest.approx(ev["perplexity_after"], rel=1e-4)
    assert ev["perplexity_after"] < 1.5 * ev["perplexity_before"]


def test_stories_act_order_v2_three_bit_and_module_list(tmp_path):
    res = _run(tmp_path, "q3", {"bits": 3, "group_size": 32, "desc_act": True, "format": "gptq_v2", "sym": False,
                                "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj"],
                                                                 ["self_attn.o_proj"]]}, evaluate=False)
    qc = res["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["desc_act"] and not qc["act_group_aware"]
    assert "model.layers.2.self_attn.v_proj" in res["skipped_modules"]
    assert res["quantized_modules"] == 15


def test_validation_and_unknown_blocks(tmp_path):
    m = GPTQMethod()
    text = ["Once upon a time there was a cat. " * 10]
    with pytest.raises(InvalidConfig) as e:
        m.validate({"quant_method": "gptq", "bits": 5, "dataset": text})
    assert e.value.field == "bits"
    with pytest.raises(InvalidConfig) as e:
        m.validate({"quant_method": "gptq", "bits": 4})
    assert e.value.field == "dataset"
    assert m.validate({"quant_method": "gptq", "bits": 4, "dataset": text, "desc_act": True})["act_group_aware"] is False
    with pytest.raises(Exception) as e:
        _run(tmp_path, "bad", {"bits": 4, "block_name_to_quantize": "model.blocks"}, evaluate=False)
    assert "block_name_to_quantize" in str(e.value)


def test_calibration_sources(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(STORIES))
    c = load_calibration(["Once upon a time there was a cat. " * 40], tok, nsamples=4, seqlen=64, seed=1)
    assert c.input_ids.shape == (4, 64) and c.describe()["tokens"] == 256
    assert load_calibration(["Once upon a time. " * 80], tok, nsamples=4, seqlen=64, seed=1).sha256 != \
        load_calibration(["Once upon a time. " * 80], tok, nsamples=4, seqlen=64, seed=2).sha256
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"line {i} of the story"}) for i in range(50)))
    text, src = resolve_text(str(p), CalibrationSources.here([tmp_path]))
    assert "line 49" in text and "c.jsonl" in src
    with pytest.raises(CalibrationDataError) as e:
        resolve_text(str(p))  # no allowed roots: no local files
    assert e.value.field == "dataset"
    with pytest.raises(CalibrationDataError) as e:
        resolve_text("wikitext2")
    msg = str(e.value)
    assert ("not reachable" in msg or "not installed" in msg) and "list of strings" in msg
    with pytest.raises(CalibrationDataError):
        resolve_text("no-such-name")
