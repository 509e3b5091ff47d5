"""The consumer libraries scripts/setup.sh installs work here, on the CPU, on qaas' own outputs.

A smoke test per library, the thorough interoperability tests live with each format: GPTQModel loads a
GPTQ checkpoint made by qaas' engine on its pure-torch backend, its layers computing what an
independent dequantization of the file gives; llama.cpp (built from source) converts, quantizes and
runs stories260K and exports `ggml_quantize_chunk`; compressed-tensors, optimum, peft and gguf import
and read. In CI a missing library fails (support.consumers.require), it is never skipped.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES

from support.consumers import require
from support.llama_cpp_source import convert_hf_to_gguf

CALIBRATION = ["Once upon a time there was a little girl named Lily. She loved to play outside in the sun.",
               "The little dog ran to the park and found a big red ball under a tree.",
               "One day, Tom and his mom went to the store to buy some milk and bread."] * 4


def _reporter():
    class Quiet:
        def stage(self, *a, **k): ...
        def progress(self, *a, **k): ...
        def log(self, *a, **k): ...
        def check_cancelled(self): ...

    return Quiet()


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory) -> Path:
    """4-bit symmetric g32 GPTQ of a tiny random Llama (every linear layer a multiple of 32 wide)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    src = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((STORIES / name).read_bytes())
    out = tmp_path_factory.mktemp("gptq") / "out"
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "dataset": CALIBRATION}
    quantize({"path": str(src)}, qc, out, options=EngineOptions(allowed_roots=(str(src.parent),), evaluate=False),
             reporter=_reporter())
    return out


# Run in a child: GPTQModel patches transformers and torch as it imports, which must not leak into other tests.
GPTQMODEL_PROBE = r"""
import json, sys, torch
from safetensors.torch import load_file
from gptqmodel import BACKEND, GPTQModel

ckpt = sys.argv[1]
model = GPTQModel.load(ckpt, backend=BACKEND.GPTQ_TORCH, device="cpu")
tensors = load_file(f"{ckpt}/model.safetensors")
bits, shifts = 4, torch.arange(0, 32, 4, dtype=torch.int32)

def unpack(words, dim):  # eight 4-bit fields per int32, lowest bits first, along `dim`
    fields = (words.unsqueeze(dim + 1) >> shifts.view(*([1] * (dim + 1)), -1, *([1] * (words.dim() - dim - 1)))) & 0xF
    return fields.flatten(dim, dim + 1)

checked = {}
torch.manual_seed(0)
for name, module in model.model.named_modules():
    if not hasattr(module, "qweight"):
        continue
    # independent dequantization of the file (GPTQ v1: the stored zero point is zero - 1)
    q = unpack(tensors[f"{name}.qweight"], 0).to(torch.float32)           # [in, out]
    zeros = unpack(tensors[f"{name}.qzeros"], 1).to(torch.float32) + 1     # [groups, out]
    scales = tensors[f"{name}.scales"].to(torch.float32)                   # [groups, out]
    g_idx = tensors[f"{name}.g_idx"].long()
    weight = (q - zeros[g_idx]) * scales[g_idx]                            # [in, out]
    x = torch.randn(3, weight.shape[0], dtype=torch.float16)
    with torch.no_grad():
        got = module(x).float()
    want = x.float() @ weight
    checked[name] = [type(module).__name__, float((got - want).abs().max()), float(want.abs().max())]
with torch.no_grad():
    logits = model.model(torch.tensor([[1, 5, 9, 33, 100]])).logits
print(json.dumps({"layers": checked, "logits_finite": bool(torch.isfinite(logits).all())}))
"""


def test_gptqmodel_loads_a_qaas_gptq_checkpoint_on_its_torch_backend(gptq_checkpoint, tmp_path):
    require("gptqmodel")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-P", "-c", GPTQMODEL_PROBE, str(gptq_checkpoint)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-4000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    layers = probe["layers"]
    assert len(layers) == 2 * 7, sorted(layers)  # q, k, v, o, gate, up, down in both blocks
    for name, (kind, err, scale) in layers.items():
        assert kind == "TorchLinear", (name, kind)  # BACKEND.GPTQ_TORCH: GPTQModel's pure-torch kernel
        assert err <= 1e-2 * scale, (name, err, scale)  # fp16 compute against the fp32 reference
    assert probe["logits_finite"]


def test_llama_cpp_converts_quantizes_and_runs_stories260k(tmp_path):
    llama_cpp = require("llama_cpp")
    f16 = tmp_path / "stories-f16.gguf"
    convert_hf_to_gguf(STORIES, f16, "f16")

    q8 = tmp_path / "stories-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(q8).encode(), ctypes.byref(params)) == 0
    assert 0 < q8.stat().st_size < f16.stat().st_size

    for path in (f16, q8):
        model = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
        text = model("Once upon a time", max_tokens=12, temperature=0.0)["choices"][0]["text"]
        assert text.startswith(", there was a little girl named Lily"), (path.name, text)

    # the GGUF quantizer tests call ggml's own quantizer through ctypes
    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    assert base.ggml_quantize_chunk


def test_compressed_tensors_optimum_peft_and_gguf_import_and_read(tmp_path):
    ct = require("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    assert ModelCompressor and QuantizationConfig and ct.__version__
    require("optimum")
    from optimum.version import __version__ as optimum_version

    assert optimum_version.startswith("2.")
    peft = require("peft")
    assert peft.LoraConfig(r=4, target_modules=["q_proj"]).r == 4
    gguf = require("gguf")
    f16 = tmp_path / "stories.gguf"
    convert_hf_to_gguf(STORIES, f16, "f16")
    reader = gguf.GGUFReader(str(f16))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert len(reader.tensors) == 47  # 5 blocks x 9, the embeddings and the final norm (the head is tied)
    # transformers' own check for GPTQ support: the GPTQ integration finds GPTQModel
    from transformers.utils import is_gptqmodel_available

    assert is_gptqmodel_available()
