"""Calibration data for every method that calibrates: what a request's `dataset` names, turned into token windows.

GPTQ's `dataset` uses it today; AWQ's calibration set, SmoothQuant's activation ranges, an importance matrix
and fine-tuning text take the same kinds of value, so this module is shared: a method chooses only how many
windows of how many tokens it wants (`load_calibration`).

Accepted `dataset` values, and whether one can be had here, are the rules of
`qaas.quantization_rules.calibration` (the API applies them at submission): a list of strings (the text
itself); "wikitext2", "c4", "c4-new" (the GPTQ paper's sets) or a Hub dataset id ("owner/name", its "text"
column of the train split), from a local copy the operator registered or through the `datasets` library; a
local file: `.txt` (the text), `.jsonl` (one JSON object per line, its "text" field), `.json` (a list of
strings or of {"text": ...}).

Sampling follows the paper: the text is tokenized once, and `nsamples` windows of `seqlen` tokens start at
random offsets drawn from a seeded generator. What was used (source, samples, tokens, the text's tokens and
the distinct tokens of the windows, sha256 of the token ids, warnings when the text is too short for what
was asked) is recorded in `CalibrationSet.describe()`. A text of fewer than MIN_CALIBRATION_TOKENS tokens is
refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qaas.quantization_rules import CalibrationSources, FieldError
from qaas.quantization_rules.calibration import (
    HOW_TO_PASS_TEXT,
    MIN_CALIBRATION_TOKENS,
    PAPER_SETS,
    Dataset,
    check_source,
    dataset_kind,
    local_file,
)

from .errors import CalibrationDataError


@dataclass
class CalibrationSet:
    #: `[nsamples, seqlen]` int64 token ids (CPU)
    input_ids: torch.Tensor
    source: str
    seed: int
    #: Tokens of the text the windows were drawn from (None: not drawn from a text).
    text_tokens: int | None = None
    #: What the job should be told about the draw (a text too short for what was asked).
    warnings: list[str] = field(default_factory=list)

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def distinct_tokens(self) -> int:
        return int(self.input_ids.unique().numel())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.nsamples,
            "seqlen": self.seqlen,
            "tokens": self.tokens,
            "text_tokens": self.text_tokens,
            "distinct_tokens": self.distinct_tokens,
            "seed": self.seed,
            "sha256": self.sha256,
            "warnings": list(self.warnings),
        }


def _hub_unreachable(name: str, exc: BaseException) -> CalibrationDataError:
    return CalibrationDataError(
        f"calibration dataset {name!r} must be fetched from the Hugging Face Hub, which is not reachable from "
        f"this worker ({type(exc).__name__}: {exc}); {HOW_TO_PASS_TEXT}",
        field="dataset",
    )


def _load_datasets_text(name: str) -> str:
    """Text of a paper set or a Hub dataset id through the `datasets` library (which `check_source` found
    installed, with the hub not switched off)."""
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
            return "\n\n".join(rows)
        if name in ("c4", "c4-new"):
            ds = load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
            return "\n\n".join(ds["text"][:20000])
        ds = load_dataset(name, split="train")
    except (ConnectionError, OSError, TimeoutError) as exc:
        raise _hub_unreachable(name, exc) from None
    except Exception as exc:  # datasets raises many types for "not found" / "offline"
        msg = str(exc).lower()
        if any(k in msg for k in ("connect", "offline", "resolve", "network", "timed out", "unreachable")):
            raise _hub_unreachable(name, exc) from None
        raise CalibrationDataError(f"calibration dataset {name!r} could not be loaded: {exc}", field="dataset") from None
    if "text" not in ds.column_names:
        raise CalibrationDataError(
            f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})", field="dataset"
        )
    return "\n\n".join(t for t in ds["text"] if isinstance(t, str))


def _read_local(path: Path) -> str:
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CalibrationDataError(f"calibration file {path} cannot be read: {exc.strerror}", field="dataset") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise CalibrationDataError(f"{path.name}: line {i} is not JSON", field="dataset") from None
            t = obj.get("text") if isinstance(obj, dict) else obj
            if isinstance(t, str):
                texts.append(t)
        return "\n\n".join(texts)
    if suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            raise CalibrationDataError(f"{path.name} is not JSON", field="dataset") from None
        if isinstance(obj, list):
            return "\n\n".join(o if isinstance(o, str) else str(o.get("text", "")) for o in obj)
        raise CalibrationDataError(f"{path.name}: expected a JSON list of strings", field="dataset")
    return raw


def resolve_text(dataset: Any, sources: CalibrationSources | None = None) -> tuple[str, str]:
    """(text, description of the source) for a `dataset` value, read with `sources` (default: texts only)."""
    sources = sources or CalibrationSources()
    try:
        dataset = Dataset().check(dataset, "dataset")
        check_source(dataset, sources)
    except FieldError as exc:
        raise CalibrationDataError(f"dataset: {exc.message}", field="dataset") from None
    kind = dataset_kind(dataset)
    if kind == "texts":
        return "\n\n".join(dataset), f"list of {len(dataset)} strings"
    if kind == "file":
        path = local_file(dataset, sources.roots)
        return _read_local(path), f"file {path.name}"
    copy = sources.registered.get(dataset)
    if copy is not None:
        return _read_local(Path(copy)), f"{dataset} (local copy {Path(copy).name})"
    return _load_datasets_text(dataset), (dataset if dataset in PAPER_SETS else f"hub dataset {dataset}")


def sample_windows(ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets (the GPTQ paper's sampling).

    With fewer than `seqlen + 1` tokens, one window of all the tokens is returned.
    """
    if len(ids) <= seqlen:
        return torch.tensor(ids, dtype=torch.long)[None, :]
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[i : i + seqlen])
    return torch.tensor(rows, dtype=torch.long)


def draw_warnings(text_tokens: int, nsamples: int, seqlen: int, distinct: int) -> list[str]:
    """What a job is told when its text is too short for the windows it asked for."""
    asked = nsamples * seqlen
    if text_tokens <= seqlen:
        return [f"the calibration text holds {text_tokens:,} tokens ({distinct:,} distinct), less than one window of "
                f"{seqlen:,}: one window of {text_tokens:,} tokens is used instead of {nsamples} x {seqlen:,}"]
    if asked > text_tokens:
        return [f"calibration asks {nsamples} x {seqlen:,} = {asked:,} tokens, the text holds {text_tokens:,} "
                f"({distinct:,} distinct in the windows): the windows overlap, each token is drawn about "
                f"{asked / text_tokens:.1f} times"]
    return []


#: characters per piece when a long text is encoded as a batch of pieces (a constant, so a text's pieces, and
#: hence its tokens, do not depend on the machine)
PIECE_CHARS = 1 << 18


def piece_cuts(text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """Where to cut `text` into pieces of at least `piece_chars` characters: before a single space between two
    non-space characters, the first such place `piece_chars` or more after the last cut (a stretch of
    `piece_chars` characters without one, e.g. text without spaces, is not cut)."""
    cuts: list[int] = []
    at = piece_chars
    while at < len(text):
        pos = text.find(" ", at, at + piece_chars)
        while pos != -1 and (pos + 1 >= len(text) or text[pos - 1].isspace() or text[pos + 1].isspace()):
            pos = text.find(" ", pos + 1, at + piece_chars)
        if pos != -1:
            cuts.append(pos)
            at = pos + piece_chars
        else:
            at += piece_chars
    return cuts


def _cuts_invisible(tokenizer: Any, text: str, cuts: list[int], context: int = 256) -> bool:
    """Whether the tokenizer encodes the text around every cut the same, cut or not."""
    spans = [(max(0, c - context), c, c + context) for c in cuts]
    texts = ([text[a:b] for a, _, b in spans] + [text[a:c] for a, c, _ in spans] + [text[c:b] for _, c, b in spans])
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n = len(spans)
    return all(list(enc[i]) == list(enc[n + i]) + list(enc[2 * n + i]) for i in range(n))


def tokenize_text(tokenizer: Any, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """The token ids of `text`, as encoding it whole gives them, on all cores.

    A fast tokenizer encodes one string on one thread (2.5 s for the 8 M characters a 128 x 2048 calibration
    draw reads: the largest fixed cost of an 8B GPTQ job on the GPU); a batch of strings it encodes on all
    cores. So a long text is cut into pieces where encoding cannot tell a cut from none: right before a space
    between two words. The pre-tokenizers of byte-level BPE (GPT-2, Llama 3, SmolLM2: the space starts the next
    word's token) and sentencepiece's Metaspace ("▁word"; a piece that starts with the marker is not prefixed
    again) split there, so the pieces' tokens concatenated are the whole text's. A tokenizer that encodes the
    text around a cut differently (checked at every cut) gets the text whole."""
    cuts = piece_cuts(text, piece_chars) if getattr(tokenizer, "is_fast", False) else []
    if not cuts or not _cuts_invisible(tokenizer, text, cuts):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return [t for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"] for t in ids]


def load_calibration(
    dataset: Any,
    tokenizer: Any,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sources: CalibrationSources | None = None,
) -> CalibrationSet:
    """Resolve `dataset`, tokenize with `tokenizer` (a transformers tokenizer), sample windows."""
    text, source = resolve_text(dataset, sources)
    # Tokenizing a large corpus whole is slow: take a prefix that surely holds enough tokens, which keeps
    # the draw reproducible for a given text.
    need = nsamples * seqlen * 4
    chunk = text[: need * 8] if len(text) > need * 8 else text
    ids = tokenize_text(tokenizer, chunk)
    if len(ids) < MIN_CALIBRATION_TOKENS:
        raise CalibrationDataError(f"dataset: the calibration text holds {len(ids)} tokens; at least "
                                   f"{MIN_CALIBRATION_TOKENS} are needed", field="dataset")
    windows = sample_windows(ids, nsamples, seqlen, seed)
    distinct = int(windows.unique().numel())
    return CalibrationSet(windows, source, seed, text_tokens=len(ids),
                          warnings=draw_warnings(len(ids), nsamples, seqlen, distinct))
