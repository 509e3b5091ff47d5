"""Evaluation: the text it runs on (packaged default, never the calibration text) and the block-streamed passes
(equal to the whole-model evaluation, on the exported files as read back)."""

from __future__ import annotations

import pytest
import torch

from qaas import eval_text
from qaas.worker.engine.architecture import inspect_model, load_hf_config
from qaas.worker.engine.checkpoint import CheckpointReader
from qaas.worker.engine.errors import InvalidConfig
from qaas.worker.engine.evaluate import (
    calibration_ngrams,
    choose_text,
    load_eval_data,
    load_original_model,
    perplexity,
)
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize
from qaas.worker.engine.streamed_eval import StreamedEvaluator

from .conftest import ASSETS, STORIES, WIKITEXT


def _streamed_vs_whole(src, data, batch_tokens):
    reader = CheckpointReader(src)
    layout = inspect_model(src, reader, hf_config=load_hf_config(src))
    ev = StreamedEvaluator(layout, data, device=torch.device("cpu"), dtype=torch.float32, batch_tokens=batch_tokens)
    streamed = ev.run(reader.load_many)
    reader.close()
    whole = perplexity(load_original_model(src, device="cpu"), data, device="cpu")
    return streamed, whole


@pytest.mark.parametrize("batch_tokens", [256, 4096])
def test_streamed_perplexity_equals_the_whole_model_tied_embeddings(batch_tokens):
    """stories260K (tied head): every window through block i, then i+1, in batches of 1 or all windows."""
    data = load_eval_data(STORIES, WIKITEXT, seqlen=256, max_windows=5)
    streamed, whole = _streamed_vs_whole(STORIES, data, batch_tokens)
    assert streamed.perplexity == pytest.approx(whole, rel=1e-5)
    assert len(streamed.nll) == 5 and streamed.seconds > 0


def test_streamed_perplexity_equals_the_whole_model_mixed_block_types(tmp_path):
    """Sliding-window and full-attention blocks (Qwen3 layer_types), windows longer than the sliding window:
    each block gets its own type's mask; an untied head."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      use_sliding_window=True, sliding_window=32, max_window_layers=1,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((STORIES / name).read_bytes())
    data = load_eval_data(tmp_path, WIKITEXT, seqlen=128, max_windows=3)
    streamed, whole = _streamed_vs_whole(tmp_path, data, 256)
    assert streamed.perplexity == pytest.approx(whole, rel=1e-5)


def test_windows_sharing_text_with_calibration_are_left_out():
    text = choose_text(None, None, None)  # the packaged text
    full = load_eval_data(STORIES, seqlen=128, max_windows=8, text=text)
    calib = torch.stack([full.input_ids[1, 10:74], full.input_ids[4, :64]])  # runs of windows 1 and 4
    data = load_eval_data(STORIES, seqlen=128, max_windows=8, text=text, calibration_windows=calib)
    assert data.left_out == 2 and data.windows == 8
    kept = [row.tolist() for row in data.input_ids]
    assert full.input_ids[1].tolist() not in kept and full.input_ids[4].tolist() not in kept
    assert kept[:3] == [full.input_ids[i].tolist() for i in (0, 2, 3)]
    assert data.describe()["windows_left_out"] == 2
    # a run shorter than OVERLAP_TOKENS is a coincidence, not a shared passage
    short = full.input_ids[1:2, : eval_text.OVERLAP_TOKENS - 1]
    assert load_eval_data(STORIES, seqlen=128, max_windows=8, text=text, calibration_windows=short).left_out == 0
    assert calibration_ngrams(None) == set()


def _gptq(tmp_path, dataset, **opts):
    options = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(tmp_path)), eval_max_windows=4,
                            eval_seqlen=128, **opts)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": dataset, "nsamples": 16,
          "model_seqlen": 128}
    return quantize({"path": str(STORIES)}, qc, tmp_path / "out", options=options)


def test_gptq_calibrated_on_the_default_text_is_evaluated_only_where_calibration_never_looked(tmp_path):
    """Calibration drawn from the packaged text's first passages: the default evaluation leaves out the windows
    it shares with the calibration windows, says so, and evaluates the rest of the packaged text."""
    head = eval_text.PACKAGED_TEXT.read_text()[:6000]
    r = _gptq(tmp_path, [head])
    ev = r["evaluation"]
    assert ev["text_sha256"] == eval_text.packaged_sha256()
    assert ev["windows"] == 4 and ev["windows_left_out"] >= 1
    assert ev["perplexity_after"] > 1 and ev["mode"] == "streamed beside the quantization"
    assert "as the checkpoint stores them" in ev["measured"]["quantized"]


def test_job_eval_text_is_used_and_never_the_calibration_dataset(tmp_path):
    mine = tmp_path / "domain.txt"
    mine.write_text(WIKITEXT.read_text()[:200_000])
    calib = tmp_path / "calib.txt"
    calib.write_text(eval_text.PACKAGED_TEXT.read_text()[-50_000:])
    with pytest.raises(InvalidConfig) as exc:  # refused before any work
        _gptq(tmp_path, str(calib), eval_text=str(calib))
    assert exc.value.field == "eval_text" and "calibration dataset itself" in exc.value.message
    copy = tmp_path / "copy.txt"
    copy.write_bytes(calib.read_bytes())
    with pytest.raises(InvalidConfig):  # the same bytes under another name
        _gptq(tmp_path, str(calib), eval_text=str(copy))
    assert not (tmp_path / "out").exists()
    r = _gptq(tmp_path, str(calib), eval_text=str(mine))
    ev = r["evaluation"]
    import hashlib

    assert ev["text"]["sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest() == ev["text_sha256"]
    assert ev["text"]["source"] == "options.eval_text (file domain.txt)" and ev["windows_left_out"] == 0


def test_streamed_pass_holds_one_block_at_a_time(monkeypatch):
    """What lets a model larger than the device be evaluated: when a block is given memory, every block before
    it has been freed (back on the meta device)."""
    import weakref

    from qaas.worker.engine import streamed_eval

    seen: list[weakref.ref] = []
    alive_at_load: list[int] = []
    real = streamed_eval.materialize_block

    def counting(block, *a, **k):
        alive_at_load.append(sum(1 for r in seen if r() is not None
                                 and next(r().parameters()).device.type != "meta"))
        seen.append(weakref.ref(block))
        return real(block, *a, **k)

    monkeypatch.setattr(streamed_eval, "materialize_block", counting)
    data = load_eval_data(STORIES, WIKITEXT, seqlen=128, max_windows=2)
    streamed, whole = _streamed_vs_whole(STORIES, data, 4096)
    assert alive_at_load == [0, 0, 0, 0, 0]  # five blocks, each loaded into an otherwise empty device
    assert streamed.perplexity == pytest.approx(whole, rel=1e-5)


def _gptq_evaluated(src, out, **opts):
    """A GPTQ job on `src` evaluated on 3 windows of the packaged text, on the CPU."""
    options = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(src)), eval_max_windows=3,
                            eval_seqlen=128, **opts)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": str(WIKITEXT), "nsamples": 8,
          "model_seqlen": 128}
    return quantize({"path": str(src)}, qc, out, options=options)


@pytest.fixture(scope="module")
def tiny_llama_fp16(tmp_path_factory):
    """A float16 checkpoint (untied head): its embeddings are stored as they are, so both of the evaluation's
    streams start from the one capture."""
    from transformers import LlamaConfig

    from .conftest import save_random_model

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return save_random_model(tmp_path_factory.mktemp("tiny_llama_fp16"), cfg, seed=3, dtype=torch.float16,
                             tokenizer_from=STORIES)


@pytest.mark.parametrize("model", ["stories260K", "tiny_llama_fp16"])
def test_gptq_evaluated_beside_the_quantization_equals_the_exported_files_read_back(model, tmp_path, request):
    """The windows ride GPTQ's block stream (the original through each block before it is quantized, the
    quantized after, every tensor as stored): the same perplexities as the streamed passes over the source and
    over the exported files read back, and as the whole-model evaluation; the same checkpoint written."""
    src = STORIES if model == "stories260K" else request.getfixturevalue(model)
    beside = _gptq_evaluated(src, tmp_path / "beside")
    read_back = _gptq_evaluated(src, tmp_path / "read_back", eval_read_back=True)
    whole = _gptq_evaluated(src, tmp_path / "whole", eval_streamed=False)
    b, r, w = beside["evaluation"], read_back["evaluation"], whole["evaluation"]
    assert b["mode"] == "streamed beside the quantization" and r["mode"] == "streamed block by block"
    assert "in the quantization's block stream" in b["measured"]["quantized"]
    assert "eval_read_back=True" in b["measured"]["quantized"]
    assert b["windows"] == r["windows"] == 3 and b["text_sha256"] == r["text_sha256"]
    assert b["perplexity_before"] == pytest.approx(r["perplexity_before"], rel=1e-5)
    assert b["perplexity_before"] == pytest.approx(w["perplexity_before"], rel=1e-5)
    assert b["perplexity_after"] == pytest.approx(r["perplexity_after"], rel=1e-5)
    assert b["perplexity_after"] == pytest.approx(w["perplexity_after"], rel=1e-5)
    assert b["perplexity_after"] != pytest.approx(b["perplexity_before"], rel=1e-4)  # it measured the quantized
    assert set(b["seconds"]) >= {"original", "quantized", "total"} and b["seconds"]["total"] > 0
    assert beside["layer_errors"] == read_back["layer_errors"]  # the evaluation never touched the quantization
    shards = sorted(p.name for p in (tmp_path / "beside").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "read_back").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "beside" / name).read_bytes() == (tmp_path / "read_back" / name).read_bytes()


def test_evaluation_beside_the_quantization_reports_its_stage_after_the_blocks(tiny_llama_fp16, tmp_path):
    """The windows' block passes happen inside the quantize stage without events of their own (its progress is
    the blocks'); the evaluate stage that follows is the two heads, a step each, with their perplexities."""
    from .conftest import RecordingReporter

    rec = RecordingReporter()
    options = EngineOptions(device="cpu", allowed_roots=(str(ASSETS), str(tiny_llama_fp16)), eval_max_windows=2,
                            eval_seqlen=64)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": str(WIKITEXT), "nsamples": 4,
          "model_seqlen": 64}
    ev = quantize({"path": str(tiny_llama_fp16)}, qc, tmp_path / "out", options=options, reporter=rec)["evaluation"]
    assert rec.stages == ["resolve", "load", "calibrate", "quantize", "evaluate", "export"]
    at = [i for i, e in enumerate(rec.events) if e[0] == "stage"]
    stage_of = {name: rec.events[a + 1 : b] for name, a, b in zip(rec.stages, at, at[1:] + [len(rec.events)])}
    assert ("stage", "evaluate", 2) in rec.events
    heads = [e for e in stage_of["evaluate"] if e[0] == "progress"]
    assert [(e[1], e[2]) for e in heads] == [(1, 2), (2, 2)]
    assert [e[3]["perplexity"] for e in heads] == [ev["perplexity_before"], ev["perplexity_after"]]
    blocks = [e for e in stage_of["quantize"] if e[0] == "progress" and e[3] and "layers" in e[3]]
    assert [(e[1], e[2]) for e in blocks] == [(1, 3), (2, 3), (3, 3)]
    assert all(e[2] == 3 for e in stage_of["quantize"] if e[0] == "progress")
