"""GGUF jobs with `imatrix: true`, on the tiny 256-wide Llama of test_gguf.py (real k-quants, not fallbacks):

* the importance matrix the job writes (imatrix.gguf, llama.cpp's format) is the mean over the calibration
  tokens of each input column's square of every block linear layer, as forward hooks on the transformers
  model running the same windows compute it independently;
* every file quantized with it is byte for byte what `llama-quantize --imatrix imatrix.gguf` makes of our F16
  file: `llama_model_quantize` given the matrix and the `quantize.imatrix.*` metadata that tools/quantize adds
  from the file (its name as given on the command line, first dataset, entry and chunk counts).

Deliberate difference: none in these files. quantize.cpp cuts the file name and the dataset to 127 bytes; ours
are cut at a character boundary at most 127 bytes in (the same text unless the cut falls inside a multibyte
character).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHAKESPEARE
from support.ggml_oracle import imatrix_args, llama_model_quantize, read_imatrix
from support.gguf_files import gguf_fields as _fields
from support.gguf_files import gguf_tensors as _tensors
from support.gguf_files import run_gguf_job as _run

from .test_gguf import tiny_llama3_dir  # noqa: F401  (the fixture)

TYPES = ["F16", "Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S", "Q6_K", "IQ4_NL", "IQ4_XS"]
CALIBRATION = {"nsamples": 6, "model_seqlen": 64, "seed": 1}


@pytest.fixture(scope="module")
def imatrix_job(tmp_path_factory, tiny_llama3_dir) -> tuple[dict, Path]:  # noqa: F811
    out = tmp_path_factory.mktemp("gguf-imatrix") / "tiny"
    text = SHAKESPEARE.read_text()[:40000]
    return _run(tiny_llama3_dir, out, TYPES, imatrix=True, dataset=[text], **CALIBRATION), out


def test_imatrix_is_the_mean_square_input_of_each_column(imatrix_job, tiny_llama3_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qaas.worker.engine.calibration_data import load_calibration

    job, out = imatrix_job
    assert job["gguf"]["imatrix"]["file"] == "imatrix.gguf"
    ours = read_imatrix(out / "imatrix.gguf")
    tok = AutoTokenizer.from_pretrained(tiny_llama3_dir)
    windows = load_calibration([SHAKESPEARE.read_text()[:40000]], tok, nsamples=CALIBRATION["nsamples"],
                               seqlen=CALIBRATION["model_seqlen"], seed=CALIBRATION["seed"]).input_ids
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3_dir, torch_dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                tokens[name] = tokens.get(name, 0) + x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    gguf_name = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    expected = {f"blk.{n.split('.')[2]}.{gguf_name[n.split('.', 3)[3]]}.weight": (s / tokens[n]).float().numpy()
                for n, s in sums.items()}
    assert sorted(ours) == sorted(expected) and len(ours) == 2 * 7  # every block linear, no head
    for name, v in expected.items():
        np.testing.assert_allclose(ours[name], v, rtol=2e-5, err_msg=name)
    assert all(tokens[n] == CALIBRATION["nsamples"] * CALIBRATION["model_seqlen"] for n in tokens)


@pytest.mark.parametrize("type_name", TYPES[1:])
def test_imatrix_file_is_what_llama_quantize_makes_with_that_imatrix(imatrix_job, type_name, tmp_path):
    job, out = imatrix_job
    theirs = tmp_path / f"llama-quantize-{type_name}.gguf"
    llama_model_quantize(out / "model-F16.gguf", theirs, type_name, **imatrix_args(out / "imatrix.gguf", "imatrix.gguf"))
    ours = out / f"model-{type_name}.gguf"
    if ours.read_bytes() != theirs.read_bytes():
        a, b = _tensors(ours), _tensors(theirs)
        assert list(_fields(ours).items()) == list(_fields(theirs).items())
        assert [n for n in a if a[n] != b.get(n)] == []
        raise AssertionError("same metadata and tensors, but not the same bytes")


def test_the_imatrix_changes_the_bytes(imatrix_job, tmp_path):
    """Not a no-op: without the importance matrix llama-quantize writes other bytes."""
    job, out = imatrix_job
    plain = tmp_path / "plain-Q4_K_M.gguf"
    llama_model_quantize(out / "model-F16.gguf", plain, "Q4_K_M")
    assert plain.read_bytes() != (out / "model-Q4_K_M.gguf").read_bytes()


def test_quantized_files_record_the_imatrix_as_llama_quantize_does(imatrix_job):
    """The keys llama.cpp's tools read back (llama-quantize's log, the Hub's GGUF viewer), with llama-quant.cpp's
    types: strings, and UINT32 counts."""
    import gguf

    job, out = imatrix_job
    for type_name in TYPES[1:]:
        fields = gguf.GGUFReader(out / f"model-{type_name}.gguf").fields
        keys = list(fields)
        assert keys[-5:] == ["general.file_type", "quantize.imatrix.file", "quantize.imatrix.dataset",
                             "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"], type_name
        got = {k: (fields[k].types, fields[k].contents()) for k in keys[-4:]}
        assert got == {"quantize.imatrix.file": ([gguf.GGUFValueType.STRING], "imatrix.gguf"),
                       "quantize.imatrix.dataset": ([gguf.GGUFValueType.STRING], job["calibration"]["source"]),
                       "quantize.imatrix.entries_count": ([gguf.GGUFValueType.UINT32], 2 * 7),
                       "quantize.imatrix.chunks_count": ([gguf.GGUFValueType.UINT32], CALIBRATION["nsamples"])}
    assert not any(k.startswith("quantize.") for k in gguf.GGUFReader(out / "model-F16.gguf").fields)
