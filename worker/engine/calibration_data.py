"""Calibration data for every method that calibrates: what a request's `dataset` names, turned into token windows.

GPTQ's `dataset` uses it today; AWQ's calibration set, SmoothQuant's activation ranges, an importance matrix
and fine-tuning text take the same kinds of value, so this module is shared: a method chooses only how many
windows of how many tokens it wants (`load_calibration`).

Accepted `dataset` values:
  * a list of strings (the text itself);
  * "wikitext2", "c4", "c4-new": the GPTQ paper's sets, through the `datasets` library (needs a reachable hub);
  * a local file: `.txt` (the text), `.jsonl` (one JSON object per line, its "text" field), `.json` (a list of
    strings or of {"text": ...});
  * a Hub dataset id ("owner/name"), through `datasets`, its "text" column of the train split.

Sampling follows the paper: the text is tokenized once, and `nsamples` windows of `seqlen` tokens start at
random offsets drawn from a seeded generator. What was used (source, samples, tokens, sha256 of the token
ids) is recorded in `CalibrationSet.describe()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError

PAPER_SETS = ("wikitext2", "c4", "c4-new")
_HOW_TO_PASS_TEXT = (
    "pass the calibration text instead: `dataset` as a list of strings, or the path of a local .txt/.jsonl file"
)


@dataclass
class CalibrationSet:
    #: `[nsamples, seqlen]` int64 token ids (CPU)
    input_ids: torch.Tensor
    source: str
    seed: int

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
    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.nsamples,
            "seqlen": self.seqlen,
            "tokens": self.tokens,
            "seed": self.seed,
            "sha256": self.sha256,
        }


def _hub_unreachable(name: str, exc: BaseException | None = None) -> CalibrationDataError:
    why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return CalibrationDataError(
        f"calibration dataset {name!r} must be fetched from the Hugging Face Hub, which is not reachable from "
        f"this worker{why}; {_HOW_TO_PASS_TEXT}",
        field="dataset",
    )


def _load_datasets_text(name: str) -> str:
    """Text of a paper set or a Hub dataset id through the `datasets` library."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _hub_unreachable(name)
    try:
        import datasets  # noqa: F401 - optional dependency
        from datasets import load_dataset
    except ImportError:
        raise CalibrationDataError(
            f"calibration dataset {name!r} needs the `datasets` library, which is not installed on this worker; "
            + _HOW_TO_PASS_TEXT,
            field="dataset",
        ) from None
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
    except CalibrationDataError:
        raise
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


def resolve_text(dataset: Any, *, allowed_roots: tuple[str, ...] = ()) -> tuple[str, str]:
    """(text, description of the source) for a `dataset` value."""
    if dataset is None:
        raise CalibrationDataError("GPTQ needs calibration data: set `dataset`", field="dataset")
    if isinstance(dataset, (list, tuple)):
        if not dataset or not all(isinstance(t, str) for t in dataset):
            raise CalibrationDataError("`dataset` as a list must be a non-empty list of strings", field="dataset")
        return "\n\n".join(dataset), f"list of {len(dataset)} strings"
    if not isinstance(dataset, str) or not dataset.strip():
        raise CalibrationDataError("`dataset` must be a list of strings or a name", field="dataset")
    if dataset in PAPER_SETS:
        return _load_datasets_text(dataset), dataset
    path = Path(dataset).expanduser()
    looks_local = dataset.startswith(("/", ".", "~")) or path.suffix.lower() in (".txt", ".jsonl", ".json")
    if looks_local or path.exists():
        if not path.is_file():
            raise CalibrationDataError(f"calibration file {dataset} does not exist", field="dataset")
        if allowed_roots:
            real = path.resolve()
            if not any(real.is_relative_to(Path(r).resolve()) for r in allowed_roots):
                raise CalibrationDataError(
                    f"calibration file {dataset} is outside the directories this worker may read", field="dataset"
                )
        return _read_local(path), f"file {path.name}"
    if "/" in dataset:
        return _load_datasets_text(dataset), f"hub dataset {dataset}"
    raise CalibrationDataError(
        f"unknown calibration dataset {dataset!r}: use one of {', '.join(PAPER_SETS)}, a Hub dataset id "
        f"(owner/name), a local .txt/.jsonl path, or a list of strings",
        field="dataset",
    )


def sample_windows(ids: list[int], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets (the GPTQ paper's sampling).

    With fewer than `seqlen + 1` tokens, one window of all the tokens is returned.
    """
    if len(ids) < 2:
        raise CalibrationDataError("calibration text is empty after tokenization", field="dataset")
    if len(ids) <= seqlen:
        return torch.tensor(ids, dtype=torch.long)[None, :]
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        i = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[i : i + seqlen])
    return torch.tensor(rows, dtype=torch.long)


def load_calibration(
    dataset: Any,
    tokenizer: Any,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    allowed_roots: tuple[str, ...] = (),
) -> CalibrationSet:
    """Resolve `dataset`, tokenize with `tokenizer` (a transformers tokenizer), sample windows."""
    text, source = resolve_text(dataset, allowed_roots=allowed_roots)
    # Tokenizing a large corpus whole is slow: take a prefix that surely holds enough tokens, which keeps
    # the draw reproducible for a given text.
    need = nsamples * seqlen * 4
    chunk = text[: need * 8] if len(text) > need * 8 else text
    ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
    return CalibrationSet(sample_windows(list(ids), nsamples, seqlen, seed), source, seed)
