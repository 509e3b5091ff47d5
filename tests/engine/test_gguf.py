"""GGUF jobs through the engine, against llama.cpp's own tools and llama.cpp itself:

* fidelity: our F16 file holds the metadata and tensors that llama.cpp's convert_hf_to_gguf.py (from the
  llama-cpp-python source distribution) writes for the same checkpoint -- stories260K, and a tiny Llama built
  here with shapes the k-quants take whole (256-wide rows), an untied head and Llama 3 RoPE scaling;
* every quantized file is byte for byte what `llama_model_quantize` (llama-quantize) makes of our F16 file;
* consumer: llama.cpp loads every file, and F16 / Q8_0 continue stories260K's first sentence greedily as the
  source model does in transformers.

Deliberate difference from convert_hf_to_gguf.py: tensor order. We write every file in llama.cpp's loader
order (blocks by number, names sorted within), the order llama-quantize writes, so that one pass over the
source feeds all files; the converter writes the checkpoint's name order (which puts blk.10 before blk.2).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import pytest
from support.consumers import require
from support.ggml_oracle import llama_model_quantize
from support.gguf_files import assert_same_gguf, gguf_fields, gguf_tensors
from support.gguf_files import run_gguf_job as _run
from support.llama_cpp_source import convert_hf_to_gguf

from .conftest import save_random_model

QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]


@pytest.fixture(scope="module")
def tiny_llama3_dir(tmp_path_factory, stories_dir) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, rope_parameters={
                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    config.architectures = ["LlamaForCausalLM"]
    return save_random_model(tmp_path_factory.mktemp("src") / "tiny-llama3", config, seed=3,
                             tokenizer_from=stories_dir)


@pytest.fixture(scope="module")
def stories_job(tmp_path_factory, stories_dir) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gguf") / "stories"
    return _run(stories_dir, out, ["F16", *QUANT_TYPES]), out


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, tiny_llama3_dir) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gguf") / "tiny"
    return _run(tiny_llama3_dir, out, ["F16", *QUANT_TYPES]), out


@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_f16_equals_llama_cpp_converter(which, request, tmp_path):
    job, out = request.getfixturevalue(f"{which}_job")
    source = Path(job["source"]["path"])
    theirs = tmp_path / "converter-F16.gguf"
    convert_hf_to_gguf(source, theirs, "f16")
    a = assert_same_gguf(out / "model-F16.gguf", theirs)
    if which == "tiny":
        assert "rope_freqs.weight" in a and "output.weight" in a


@pytest.mark.parametrize("which", ["stories", "tiny"])
@pytest.mark.parametrize("type_name", QUANT_TYPES)
def test_quantized_file_is_what_llama_quantize_makes(which, type_name, request, tmp_path):
    job, out = request.getfixturevalue(f"{which}_job")
    theirs = tmp_path / f"llama-quantize-{type_name}.gguf"
    llama_model_quantize(out / "model-F16.gguf", theirs, type_name)
    ours = out / f"model-{type_name}.gguf"
    if ours.read_bytes() != theirs.read_bytes():
        a, b = gguf_tensors(ours), gguf_tensors(theirs)
        assert list(gguf_fields(ours).items()) == list(gguf_fields(theirs).items())
        assert [n for n in a if a[n] != b.get(n)] == []
        raise AssertionError("same metadata and tensors, but not the same bytes")


def test_result_lists_each_file_with_size_sha256_and_bits_per_weight(stories_job):
    import hashlib

    job, out = stories_job
    outputs = {o["type"]: o for o in job["gguf"]["outputs"]}
    assert list(outputs) == ["F16", *QUANT_TYPES]
    assert {f["name"] for f in job["files"]} == {f"model-{t}.gguf" for t in outputs}
    for t, o in outputs.items():
        (f,) = o["files"]
        data = (out / f["name"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert outputs["Q4_0"]["bits_per_weight"] < outputs["Q8_0"]["bits_per_weight"] < outputs["F16"]["bits_per_weight"]
    assert not (out / "config.json").exists()  # a GGUF repo holds GGUF files, not a transformers checkpoint


def test_split_files_load_as_one_model(tiny_llama3_dir, tmp_path):
    import gguf

    job = _run(tiny_llama3_dir, tmp_path / "out", ["Q8_0"], split_max_size="1M")
    names = sorted(f["name"] for f in job["files"])
    n = len(names)
    assert n > 1 and names == [f"model-Q8_0-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert all(f["size"] <= 1_000_000 + 64 * 1024 for f in job["files"])  # a part holds whole tensors + header
    counts = [len(gguf.GGUFReader(tmp_path / "out" / m).tensors) for m in names]
    assert all(counts) and sum(counts) == 2 * 9 + 4  # every tensor in exactly one part
    llama_cpp = require("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out" / names[0]), n_ctx=64, verbose=False)
    assert len(llm.tokenize(b"Once upon a time")) > 1
    llm.close()


def test_split_parts_of_stories260k_are_the_unsplit_file_for_llama_cpp(stories_dir, tmp_path):
    """stories260K in F32 (1.04 MB of tensors) with split_max_size 1M: parts named as llama.cpp's
    llama_split_path names them, the split keys its model loader reads, every tensor in exactly one part in
    the unsplit file's order, and llama.cpp loading the first part computes the unsplit file's logits bit
    for bit and continues the prompt as it does."""
    import hashlib

    import gguf
    import numpy as np

    llama_cpp = require("llama_cpp")
    whole = _run(stories_dir, tmp_path / "whole", ["F32"], output_type_default="F32")
    split = _run(stories_dir, tmp_path / "split", ["F32"], output_type_default="F32", split_max_size="1M")
    unsplit = tmp_path / "whole" / "model-F32.gguf"
    (listed,) = split["gguf"]["outputs"]
    n = len(listed["files"])
    assert n == 2
    prefix = str(tmp_path / "split" / "model-F32").encode()
    expected_paths = []
    for i in range(n):
        buf = ctypes.create_string_buffer(4096)
        llama_cpp.llama_split_path(buf, len(buf), prefix, i, n)
        expected_paths.append(Path(buf.value.decode()))
    assert [f["name"] for f in listed["files"]] == [p.name for p in expected_paths]
    assert [p.name for p in expected_paths] == ["model-F32-00001-of-00002.gguf", "model-F32-00002-of-00002.gguf"]
    back = ctypes.create_string_buffer(4096)
    assert llama_cpp.llama_split_prefix(back, len(back), str(expected_paths[0]).encode(), 0, n) > 0
    assert back.value == prefix
    # the result lists each part with its size and sha256, and the job's files are the parts
    for f, path in zip(listed["files"], expected_paths):
        data = path.read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert listed["size"] == sum(f["size"] for f in listed["files"])
    assert sorted(f["name"] for f in split["files"]) == [p.name for p in expected_paths]
    # metadata: all of it in the first part, then split.no / split.count / split.tensors.count in every part
    whole_fields = gguf_fields(unsplit)
    total = len(gguf_tensors(unsplit))
    for i, path in enumerate(expected_paths):
        reader = gguf.GGUFReader(path)
        fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        split_keys = {k: (fields[k].types, fields[k].contents()) for k in list(fields)[-3:]}
        assert split_keys == {"split.no": ([gguf.GGUFValueType.UINT16], i),
                              "split.count": ([gguf.GGUFValueType.UINT16], n),
                              "split.tensors.count": ([gguf.GGUFValueType.INT32], total)}
        rest = {k: f.contents() for k, f in list(fields.items())[:-3]}
        assert list(rest.items()) == (list(whole_fields.items()) if i == 0 else [])
        assert sum(int(t.n_bytes) for t in reader.tensors) <= 1_000_000  # the limit counts tensor bytes
    parts = [gguf_tensors(p) for p in expected_paths]
    assert all(parts)
    assert [(name, t) for part in parts for name, t in part.items()] == list(gguf_tensors(unsplit).items())
    # llama.cpp: the same model from the first part as from the unsplit file
    prompt = "Once upon a time"
    results = []
    for path in (unsplit, expected_paths[0]):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
        try:
            ids = llm.tokenize(prompt.encode())
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
            llm.reset()
            text = llm(prompt, max_tokens=16, temperature=0.0, top_k=1)["choices"][0]["text"]
            results.append((ids, logits, text))
        finally:
            llm.close()
    (ids_a, logits_a, text_a), (ids_b, logits_b, text_b) = results
    assert ids_a == ids_b and np.array_equal(logits_a, logits_b) and np.isfinite(logits_a).all()
    assert text_a == text_b and text_a.strip(), (text_a, text_b)


def test_llama_cpp_loads_every_type_and_lossless_ones_continue_like_the_source(stories_job, stories_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llama_cpp = require("llama_cpp")
    job, out = stories_job
    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    prompt = "Once upon a time"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    for o in job["gguf"]["outputs"]:
        llm = llama_cpp.Llama(model_path=str(out / o["files"][0]["name"]), n_ctx=128, verbose=False)
        try:
            got = llm(prompt, max_tokens=16, temperature=0.0, top_k=1)["choices"][0]["text"]
            assert got.strip(), o["type"]
            if o["type"] in ("F16", "Q8_0"):
                assert tok(prompt + got, return_tensors="pt").input_ids[0, ids.shape[1]:].tolist()[:12] == expected[:12], \
                    (o["type"], got, tok.decode(expected))
        finally:
            llm.close()


def test_unsupported_architecture_is_refused_naming_model(tmp_path, stories_dir):
    from qaas.worker.engine.errors import InvalidConfig

    src = tmp_path / "m"
    src.mkdir()
    for p in stories_dir.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((stories_dir / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(InvalidConfig) as exc:
        _run(src, tmp_path / "out", ["F16"])
    assert exc.value.field == "model"


def test_a_tokenizer_json_only_vocabulary_is_refused_naming_model(tmp_path, stories_dir):
    """llama.cpp's converter reads such vocabularies one of several ways (by a hash of a test tokenization):
    not verified here yet, so refused rather than written with a possibly wrong pre-tokenizer."""
    from qaas.worker.engine.errors import InvalidConfig

    src = tmp_path / "m"
    src.mkdir()
    for p in stories_dir.iterdir():
        if p.name != "tokenizer.model":
            (src / p.name).write_bytes(p.read_bytes())
    with pytest.raises(InvalidConfig) as exc:
        _run(src, tmp_path / "out", ["F16"])
    assert exc.value.field == "model" and "tokenizer.model" in str(exc.value)


def test_a_cancelled_job_leaves_no_output_and_no_writer_thread(stories_dir, tmp_path, monkeypatch):
    """Each output writes on a thread of its own: a job stopped mid-stream stops them too (no thread still
    writing into the discarded staging directory) and leaves no output directory. The outputs are kept alive
    here, so their threads cannot end by the outputs being garbage-collected: only the job's own stopping."""
    import threading

    from qaas.worker.engine.methods.gguf import format as gguf_format
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize
    from qaas.worker.engine.progress import JobCancelled, NullReporter

    made = []
    real_init = gguf_format.GGUFOutput.__init__

    def keep(self, *a, **k):
        real_init(self, *a, **k)
        made.append(self)
    monkeypatch.setattr(gguf_format.GGUFOutput, "__init__", keep)

    class CancelAfterFirstBlock(NullReporter):
        def progress(self, done, total, *, message="", metrics=None):
            if message.startswith("block"):
                self.cancel()

    out = tmp_path / "out"
    with pytest.raises(JobCancelled):
        quantize({"path": str(stories_dir)}, {"quant_method": "gguf", "types": ["F16", "Q8_0", "Q4_0"]}, out,
                 options=EngineOptions(device="cpu", allowed_roots=(str(stories_dir.parent),), evaluate=False),
                 reporter=CancelAfterFirstBlock())
    assert not out.exists()
    assert len(made) == 3 and all(o.writer.fout is None for o in made)  # every file closed
    assert not [t for t in threading.enumerate() if t.name.startswith("gguf-")]
