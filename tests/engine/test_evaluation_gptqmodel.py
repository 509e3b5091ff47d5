"""The perplexity a GPTQ job reports is the perplexity of the checkpoint the user downloads: GPTQModel (the
consumer, its pure-torch kernel) loads the exported files and measures the same windows to the same number."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qaas.worker.engine.evaluate import load_eval_data
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize
from support.consumers import require

from .conftest import ASSETS, STORIES, WIKITEXT

# In a child: GPTQModel patches transformers and torch as it imports. float16 is the most exact dtype its torch
# kernel takes on the CPU.
PROBE = r"""
import json, math, sys, torch
from gptqmodel import BACKEND, GPTQModel

model = GPTQModel.load(sys.argv[1], backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
ids = torch.tensor(json.load(open(sys.argv[2])))
kinds = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
nll = []
with torch.no_grad():
    for row in ids:
        logits = model.model(row[None], use_cache=False).logits.float()
        nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], row[1:]).item())
print(json.dumps({"perplexity": math.exp(sum(nll) / len(nll)), "kinds": kinds}))
"""


def test_reported_gptq_perplexity_is_what_gptqmodel_measures_on_the_exported_checkpoint(tmp_path):
    require("gptqmodel")
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "nsamples": 16, "model_seqlen": 256,
          "dataset": str(ASSETS / "text" / "tinyshakespeare" / "input.txt")}
    options = EngineOptions(device="cpu", allowed_roots=(str(ASSETS),), eval_text_path=str(WIKITEXT),
                            eval_max_windows=4, eval_seqlen=256)
    ev = quantize({"path": str(STORIES)}, qc, tmp_path / "out", options=options)["evaluation"]
    # the default: measured beside the quantization, on the weights as the checkpoint stores them
    assert ev["mode"] == "streamed beside the quantization" and "as the checkpoint stores them" in ev["measured"]["quantized"]
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=4)
    assert data.text_sha256 == ev["text_sha256"]
    (tmp_path / "ids.json").write_text(json.dumps(data.input_ids.tolist()))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-P", "-c", PROBE, str(tmp_path / "out"), str(tmp_path / "ids.json")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-4000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["kinds"] == ["TorchLinear"]
    # quantization moves this model's perplexity by ~2 %; float16 compute in the consumer by ~0.02 %
    assert abs(ev["perplexity_after"] / ev["perplexity_before"] - 1) > 0.005
    assert probe["perplexity"] == pytest.approx(ev["perplexity_after"], rel=2e-3)
