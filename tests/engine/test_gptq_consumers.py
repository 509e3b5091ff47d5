"""Every kind of GPTQ checkpoint qaas writes, read by the libraries people load GPTQ with: `GPTQModel.load`
(BACKEND.GPTQ_TORCH) and transformers' `AutoModelForCausalLM.from_pretrained` (through optimum + GPTQModel,
its torch kernel), each model's logits against a dequantizer written here from the file alone.

The variants cover 2/3/4/8 bits, group sizes 32/128/-1, act-order on and off, symmetric (v1) and asymmetric
(always written as gptq_v2), a partial last group (a layer that must stay in float16) and an odd width
(stories260K's 172, written padded to whole words where every consumer reads it). One child process loads
them all: GPTQModel patches torch and transformers as it imports, and its import is the slow part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import save_random_model
from support.consumers import require

CALIBRATION = ["Once upon a time there was a little girl named Lily. She loved to play outside in the sun. "
               "The little dog ran to the park and found a big red ball under a tree. One day, Tom and his "
               "mom went to the store to buy some milk and bread."] * 8
TOKENS = [[1, 5, 9, 33, 100, 7, 8, 250, 17, 400, 3, 77]]

# name -> (model, quantization_config): tiny = hidden 128 (whole groups of 128), MLP 172 (odd width).
VARIANTS = {
    "b4_g128_sym": ("tiny", {"bits": 4, "group_size": 128}),
    "b4_g32_asym_act": ("tiny", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True}),
    "b4_g-1_sym_odd": ("tiny", {"bits": 4, "group_size": -1, "act_group_aware": False}),
    "b3_g32_sym": ("tiny", {"bits": 3, "group_size": 32}),
    "b2_g-1_asym_odd": ("tiny", {"bits": 2, "group_size": -1, "sym": False}),
    "b8_g-1_sym_act_odd": ("tiny", {"bits": 8, "group_size": -1, "desc_act": True}),
    "b8_g32_asym_partial": ("tiny", {"bits": 8, "group_size": 32, "sym": False}),
    "stories_b4_g-1_asym_act": ("stories", {"bits": 4, "group_size": -1, "sym": False, "desc_act": True}),
}


# ---- an independent reader: FORMATS.md §1 and GPTQModel's buffer sizes, nothing from qaas ----------------
def _codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """`n` codes per column from int32 words packed along dim 0: each column is one little-endian bit stream
    (value j at stream bit bits*j, 3-bit values straddling words); padded words past `n` are ignored."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((w.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, w.shape[1])  # [rows*32, N]
    stream = stream[: n * bits].reshape(n, bits, -1)
    return (stream << torch.arange(bits).view(1, bits, 1)).sum(1)  # [n, N]


def dequantize_file(tensors: dict[str, torch.Tensor], module: str, bits: int, fmt: str) -> torch.Tensor:
    scales = tensors[f"{module}.scales"].float()
    g_idx = tensors[f"{module}.g_idx"].long()
    n_in, n_out = g_idx.numel(), scales.shape[1]
    assert tensors[f"{module}.qweight"].shape == (-(-n_in * bits // 32), n_out)  # GPTQModel's buffer shapes
    assert tensors[f"{module}.qzeros"].shape == (scales.shape[0], -(-n_out * bits // 32))
    q = _codes(tensors[f"{module}.qweight"], bits, n_in).float()                    # [in, out]
    z = _codes(tensors[f"{module}.qzeros"].t(), bits, n_out).t().float()            # [G, out]
    if fmt == "gptq":
        z = z + 1  # v1 stores zero - 1
    return ((q - z[g_idx]) * scales[g_idx]).t()                                      # [out, in]


def reference_logits(source: Path, ckpt: Path) -> tuple[torch.Tensor, int]:
    """The source architecture with every tensor from the checkpoint (float16 as stored, quantized layers
    dequantized here), in float32; and the number of quantized layers in the file."""
    from transformers import AutoModelForCausalLM

    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(ckpt / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    state = model.state_dict()
    quantized = [n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")]
    with torch.no_grad():
        for m in quantized:
            state[m + ".weight"].copy_(dequantize_file(tensors, m, qc["bits"], qc["checkpoint_format"]))
        for n, t in tensors.items():
            if n in state:
                state[n].copy_(t.float())
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        return model(torch.tensor(TOKENS)).logits[0], len(quantized)


# ---- the consumers, in one child ------------------------------------------------------------------------
CONSUMERS = r"""
import json, sys, torch
from gptqmodel import BACKEND, GPTQModel
from transformers import AutoModelForCausalLM, GPTQConfig

tokens = torch.tensor(json.loads(sys.argv[1]))
out = {}
for ckpt in sys.argv[2:]:
    qc = json.load(open(f"{ckpt}/config.json"))["quantization_config"]
    row = {}
    for how in ("gptqmodel", "transformers"):
        if how == "gptqmodel":
            model = GPTQModel.load(ckpt, backend=BACKEND.GPTQ_TORCH, device="cpu").model
        else:  # the torch kernel: GPTQModel's AVX-512 one JIT-compiles for minutes on first use
            model = AutoModelForCausalLM.from_pretrained(
                ckpt, device_map="cpu", quantization_config=GPTQConfig(bits=qc["bits"], backend="torch"))
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
        n = sum(1 for m in model.modules() if hasattr(m, "qweight"))
        with torch.no_grad():
            logits = model(tokens).logits[0].float()
        row[how] = {"kinds": kinds, "quantized": n, "logits": logits.tolist()}
        del model
    out[ckpt] = row
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, stories_dir) -> dict[str, tuple[Path, Path, dict]]:
    """name -> (source dir, checkpoint dir, job result) for every variant, made by qaas' pipeline."""
    from transformers import LlamaConfig

    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    root = tmp_path_factory.mktemp("gptq_consumers")
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=172, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    sources = {"tiny": save_random_model(root / "tiny", cfg, tokenizer_from=stories_dir), "stories": stories_dir}
    opts = EngineOptions(device="cpu", allowed_roots=(str(root), str(stories_dir.parent)), evaluate=False)
    made = {}
    for name, (src, qc) in VARIANTS.items():
        full = {"quant_method": "gptq", "dataset": CALIBRATION, "nsamples": 4, "model_seqlen": 64, **qc}
        res = quantize({"path": str(sources[src])}, full, root / name, options=opts)
        made[name] = (sources[src], Path(res["out_dir"]), res)
    return made


@pytest.fixture(scope="module")
def consumer_logits(checkpoints, tmp_path_factory) -> dict[str, dict]:
    require("gptqmodel")
    require("optimum")
    # TORCHDYNAMO_DISABLE: TorchLinear wraps its dequantization in torch.compile, whose inductor build per
    # layer costs minutes on a 2-core machine; eager runs the same arithmetic.
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}
    dirs = [str(c) for _, c, _ in checkpoints.values()]
    r = subprocess.run([sys.executable, "-P", "-c", CONSUMERS, json.dumps(TOKENS), *dirs], env=env,
                       cwd=tmp_path_factory.mktemp("consumer_cwd"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gptqmodel_and_transformers_read_the_checkpoint_as_written(name, checkpoints, consumer_logits):
    source, ckpt, res = checkpoints[name]
    qc = res["quantization_config"]
    want, n_quantized = reference_logits(source, ckpt)
    assert n_quantized == res["quantized_modules"] > 0
    for how, got in consumer_logits[str(ckpt)].items():
        assert got["kinds"] == ["TorchLinear"], (how, got["kinds"])
        assert got["quantized"] == n_quantized, (how, got["quantized"], n_quantized)  # skipped layers stay float
        logits = torch.tensor(got["logits"])
        err, scale = float((logits - want).abs().max()), float(want.abs().max())
        # float16 compute against the float32 reference; a misread zero point is ~10x this (issue 12: 0.125/1.4)
        assert err <= 0.015 * scale, (name, how, err, scale)
        assert (logits.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9, (name, how)
    # the format written, and why
    assert qc["checkpoint_format"] == ("gptq" if qc["sym"] else "gptq_v2")
    assert res["gptq"]["checkpoint_format"]["written"] == qc["checkpoint_format"]
    assert (res["gptq"]["checkpoint_format"]["reason"] is None) == qc["sym"]
    loads = {e["engine"]: e["loads"] for e in res["gptq"]["engines"]}
    assert loads["transformers"] and loads["gptqmodel"]


def test_odd_widths_are_padded_where_every_consumer_reads_them_and_partial_groups_stay_float(checkpoints):
    tensors = {name: load_file(str(c / "model.safetensors")) for name, (_, c, _) in checkpoints.items()}
    # 172 at 2 and 8 bits: qweight padded to whole words (2-bit: 11 words = 176 codes; 8-bit: 43 words)
    assert tensors["b2_g-1_asym_odd"]["model.layers.0.mlp.down_proj.qweight"].shape == (11, 128)
    assert tensors["b2_g-1_asym_odd"]["model.layers.0.mlp.gate_proj.qzeros"].shape == (1, 11)
    assert tensors["b8_g-1_sym_act_odd"]["model.layers.0.mlp.down_proj.qweight"].shape == (43, 128)
    # 4-bit: in 172 padded (22 words) where out is 32-aligned; out 172 stays float (transformers' CPU 4-bit
    # kernels need out_features % 32 == 0)
    assert tensors["b4_g-1_sym_odd"]["model.layers.1.mlp.down_proj.qweight"].shape == (22, 128)
    assert "model.layers.1.mlp.up_proj.weight" in tensors["b4_g-1_sym_odd"]
    res = checkpoints["b4_g-1_sym_odd"][2]
    assert any("mlp\\.up_proj" in k for k in res["quantization_config"]["dynamic"])
    # a partial last group (172 % 32) is never written: the layer stays float16 and is listed for every loader
    partial = checkpoints["b8_g32_asym_partial"][2]
    assert "model.layers.0.mlp.down_proj" in partial["skipped_modules"]
    assert tensors["b8_g32_asym_partial"]["model.layers.0.mlp.down_proj.weight"].dtype == torch.float16
    assert "model.layers.0.mlp.up_proj.qweight" in tensors["b8_g32_asym_partial"]
    assert any("partial" in n for n in partial["notes"])
    # 3-bit needs whole runs of 32 on both sides: the 172-wide MLP stays float
    assert "model.layers.0.mlp.gate_proj.weight" in tensors["b3_g32_sym"]
    # which engines load what was written (the table's rules)
    engines = {e["engine"]: e for e in checkpoints["b4_g128_sym"][2]["gptq"]["engines"]}
    assert engines["vllm"]["loads"] and engines["marlin"]["loads"] and engines["exllamav2"]["loads"]
    asym = {e["engine"]: e for e in checkpoints["b4_g32_asym_act"][2]["gptq"]["engines"]}
    assert not asym["vllm"]["loads"] and "symmetric" in asym["vllm"]["why_not"]
    assert not asym["sglang"]["loads"] and asym["exllamav2"]["loads"]
    two = {e["engine"]: e for e in checkpoints["b2_g-1_asym_odd"][2]["gptq"]["engines"]}
    assert not two["exllamav2"]["loads"] and not two["marlin"]["loads"]
