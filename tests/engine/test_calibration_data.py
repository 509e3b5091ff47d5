"""Calibration data in the engine: the operator's registered copies, the real token counts, and the warnings a
job gets when its text is too short for the windows it asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from qaas.quantization_rules import CalibrationSources
from qaas.quantization_rules.calibration import MIN_CALIBRATION_TOKENS
from qaas.worker.engine.calibration_data import load_calibration
from qaas.worker.engine.errors import CalibrationDataError
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.pipeline import quantize

from conftest import ASSETS, SHAKESPEARE, STORIES, WIKITEXT  # where the assets are: QAAS_TEST_ASSETS or ../shared


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


def test_a_registered_copy_calibrates_without_a_hub(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sources = CalibrationSources.here([ASSETS], {"wikitext2": str(WIKITEXT)})
    calib = load_calibration("wikitext2", tokenizer, nsamples=4, seqlen=64, seed=0, sources=sources)
    assert calib.source == "wikitext2 (local copy test.joined.txt)" and calib.input_ids.shape == (4, 64)
    with pytest.raises(CalibrationDataError) as exc:  # the same name, nothing registered, no hub
        load_calibration("wikitext2", tokenizer, nsamples=4, seqlen=64, sources=CalibrationSources.here([ASSETS]))
    assert exc.value.field == "dataset"


def test_the_draw_reports_real_token_counts_and_warns_when_windows_overlap(tokenizer):
    text = [SHAKESPEARE.read_text()[:3000]]
    calib = load_calibration(text, tokenizer, nsamples=16, seqlen=256, seed=0)
    d = calib.describe()
    n = len(tokenizer(text[0], add_special_tokens=False)["input_ids"])
    assert d["text_tokens"] == n < 16 * 256
    assert d["distinct_tokens"] == len(set(calib.input_ids.flatten().tolist())) < n
    assert len(d["warnings"]) == 1 and "overlap" in d["warnings"][0] and f"{n:,}" in d["warnings"][0]
    short = load_calibration(text, tokenizer, nsamples=4, seqlen=4096, seed=0)
    assert short.input_ids.shape == (1, n) and "less than one window" in short.warnings[0]
    assert load_calibration(text * 40, tokenizer, nsamples=4, seqlen=64, seed=0).warnings == []


def test_a_text_of_too_few_tokens_is_refused(tokenizer):
    text = ["the " * (MIN_CALIBRATION_TOKENS // 4 + 1)]  # enough bytes, too few tokens
    assert len(tokenizer(text[0], add_special_tokens=False)["input_ids"]) < MIN_CALIBRATION_TOKENS
    with pytest.raises(CalibrationDataError) as exc:
        load_calibration(text, tokenizer, nsamples=4, seqlen=64)
    assert exc.value.field == "dataset" and f"at least {MIN_CALIBRATION_TOKENS}" in exc.value.message


class _Events:
    def __init__(self) -> None:
        self.logs: list[tuple[str, str]] = []

    def stage(self, *a, **k) -> None: ...

    def progress(self, *a, **k) -> None: ...

    def check_cancelled(self) -> None: ...

    def log(self, message: str, *, level: str = "info", data=None) -> None:
        self.logs.append((level, message))


def test_a_gptq_job_on_a_short_text_warns_in_its_events_and_result(tmp_path):
    events = _Events()
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": [SHAKESPEARE.read_text()[:3000]],
          "nsamples": 16, "model_seqlen": 256}
    res = quantize({"path": str(STORIES)}, qc, tmp_path / "out", reporter=events,
                   options=EngineOptions(device="cpu", evaluate=False, allowed_roots=(str(ASSETS), str(tmp_path))))
    calib = res["calibration"]
    assert calib["text_tokens"] < 16 * 256 and calib["distinct_tokens"] > 0
    assert calib["warnings"] and calib["warnings"][0] in res["notes"]
    assert ("warning", calib["warnings"][0]) in events.logs


# -- a long text encoded as a batch of pieces (tokenize_text) ----------------------------------------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _trained(pre_tokenizer, text):
    """A byte-level BPE tokenizer trained on `text` behind `pre_tokenizer`, as transformers wraps one."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=800, initial_alphabet=ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _tokenizers(text):
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    return {
        "stories260K (sentencepiece, Metaspace)": AutoTokenizer.from_pretrained(str(STORIES)),
        "GPT-2 byte-level BPE": _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), text),
        "Llama 3 split + byte-level BPE": _trained(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), text),
    }


def test_a_long_text_in_pieces_gives_the_whole_texts_tokens():
    from qaas.worker.engine.calibration_data import _cuts_invisible, piece_cuts, tokenize_text

    text = WIKITEXT.read_text()[:120_000] + " " + (ASSETS / "text/tinyshakespeare/input.txt").read_text()[:60_000]
    cuts = piece_cuts(text, 2_000)
    assert len(cuts) > 60 and all(text[c] == " " and not text[c - 1].isspace() and not text[c + 1].isspace()
                                  for c in cuts)
    for name, tok in _tokenizers(text).items():
        whole = list(tok(text, add_special_tokens=False)["input_ids"])
        assert _cuts_invisible(tok, text, cuts), f"{name}: a cut changed the tokens around it"
        assert tokenize_text(tok, text, piece_chars=2_000) == whole, name


def test_a_tokenizer_that_sees_the_cuts_gets_the_text_whole():
    """A pre-tokenizer that keeps a space with the word before it: a cut before the space would change the
    tokens, so the text is encoded whole."""
    from tokenizers import pre_tokenizers

    from qaas.worker.engine.calibration_data import _cuts_invisible, piece_cuts, tokenize_text

    text = WIKITEXT.read_text()[:40_000]
    tok = _trained(pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="merged_with_previous"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                   text)
    cuts = piece_cuts(text, 2_000)
    assert cuts and not _cuts_invisible(tok, text, cuts)
    assert tokenize_text(tok, text, piece_chars=2_000) == list(tok(text, add_special_tokens=False)["input_ids"])


def test_text_without_spaces_is_not_cut():
    from qaas.worker.engine.calibration_data import piece_cuts

    assert piece_cuts("字" * 10_000, 1_000) == []
    assert piece_cuts("ab  " * 2_000, 1_000) == []  # only double spaces: no space between two words
