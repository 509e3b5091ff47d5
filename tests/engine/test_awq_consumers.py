"""AWQ checkpoints as their consumers read them, on the CPU: transformers' AWQ integration
(`AutoModelForCausalLM.from_pretrained`, which loads AWQ through GPTQModel's kernels) and GPTQModel itself
(`GPTQModel.load`, its pure-torch AWQ kernel), each in a child process (GPTQModel patches transformers and
torch as it imports). Their logits must equal those of the original architecture holding the weights an
independent dequantizer (tests/support/awq_reference.py) reads from the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE, STORIES

from support.awq_reference import dequantized_state
from support.consumers import require

IDS = [[1, 5, 9, 33, 100, 7, 250, 3, 64, 12, 400, 18]]

PROBE = r"""
import json, sys, torch
ckpt, how = sys.argv[1], sys.argv[2]
ids = torch.tensor(json.loads(sys.argv[3]))
if how == "gptqmodel":
    from gptqmodel import BACKEND, GPTQModel
    model = GPTQModel.load(ckpt, backend=BACKEND.TORCH_AWQ, device="cpu", dtype=torch.float16)
    inner = model.model
else:
    from transformers import AutoModelForCausalLM
    inner = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float16)
kinds = sorted({type(m).__name__ for n, m in inner.named_modules() if hasattr(m, "qweight")})
quantized = sum(1 for n, m in inner.named_modules() if hasattr(m, "qweight"))
with torch.no_grad():
    logits = inner(ids).logits.float()[0]
print(json.dumps({"kinds": kinds, "quantized": quantized, "logits": logits.tolist()}))
"""


@pytest.fixture(scope="module")
def awq_checkpoint(tmp_path_factory) -> Path:
    """AWQ g32 of a small random Llama with full multi-head attention (so v_proj -> o_proj is scaled too)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    src = tmp_path_factory.mktemp("tiny_llama_mha")
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((STORIES / name).read_bytes())
    out = tmp_path_factory.mktemp("awq") / "out"
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
          "dataset": str(SHAKESPEARE), "nsamples": 4, "model_seqlen": 64}
    res = quantize({"path": str(src)}, qc, out,
                   options=EngineOptions(device="cpu", allowed_roots=(str(src.parent), str(SHAKESPEARE.parent)),
                                         evaluate=False))
    assert res["quantized_modules"] == 2 * 7
    return out


def _reference_logits(ckpt: Path) -> torch.Tensor:
    """The original architecture (from the checkpoint's config) holding the independently dequantized weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(ckpt))
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    missing, unexpected = model.load_state_dict(dequantized_state(load_file(str(ckpt / "model.safetensors"))),
                                                strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits[0]


def _probe(ckpt: Path, how: str, cwd: Path) -> dict:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-P", "-c", PROBE, str(ckpt), how, json.dumps(IDS)], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["gptqmodel", "transformers"])
def test_awq_checkpoint_loads_in_its_consumer_with_logits_of_an_independent_dequantization(awq_checkpoint, how,
                                                                                           tmp_path):
    require("gptqmodel")
    probe = _probe(awq_checkpoint, how, tmp_path)
    assert probe["quantized"] == 2 * 7, probe["kinds"]
    assert all("Awq" in k for k in probe["kinds"]), probe["kinds"]  # AWQ kernels, not a float fallback
    got = torch.tensor(probe["logits"])
    want = _reference_logits(awq_checkpoint)
    # float16 kernels against a float32 reference: agreement to float16's precision, and the same argmax
    assert torch.allclose(got, want, atol=2e-2 * float(want.abs().max()), rtol=0), float((got - want).abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
