"""The rules of a `dataset` value (calibration data), for every method that calibrates.

A `dataset` is one of:
  * a list of texts (the calibration text itself);
  * "wikitext2", "c4", "c4-new": the GPTQ paper's sets, or a Hub dataset id "owner/name": fetched through
    the `datasets` library from a hub, unless the operator registered a local copy under that name;
  * the absolute path of a local `.txt` / `.jsonl` / `.json` file under the allowed roots.

Two kinds of rule: what the value itself must be (`Dataset`, checked wherever a config is validated), and
whether it can be had here (`check_source`, which needs to know the allowed roots, the registered copies
and whether a hub is usable: `CalibrationSources`). The API asks both at submission, the engine asks both
before it loads a model, so a dataset that cannot be had is refused up front, naming `dataset`.

Size: a calibration text must hold at least MIN_CALIBRATION_TOKENS tokens. Before the model's tokenizer is
known, a text of fewer UTF-8 bytes than that is refused (no tokenizer makes more tokens than bytes, bar one
leading marker); the engine counts the real tokens once it has tokenized the text.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fields import FieldError, Kind
from .hub_ids import repo_id_problem

PAPER_SETS = ("wikitext2", "c4", "c4-new")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json")
MAX_CALIBRATION_TEXTS = 4096
MAX_CALIBRATION_CHARS = 4 * 1024 * 1024
MAX_NAME_LENGTH = 1024
#: The least calibration text accepted, in tokens (refused below it, at submission and in the engine).
MIN_CALIBRATION_TOKENS = 256
HOW_TO_PASS_TEXT = "pass the calibration text instead: a list of strings, or the path of a local .txt/.jsonl file"


def dataset_kind(value: Any) -> str:
    """"texts", "named" (a paper set or a Hub dataset id) or "file", for a value `Dataset` accepted."""
    if isinstance(value, list):
        return "texts"
    return "file" if looks_like_file(value) else "named"


def looks_like_file(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or Path(value).suffix.lower() in LOCAL_SUFFIXES


def _too_small(nbytes: int, what: str) -> str:
    return (f"{what} {nbytes} bytes, fewer than the {MIN_CALIBRATION_TOKENS} tokens calibration needs "
            "at the least")


@dataclass(frozen=True)
class Dataset(Kind):
    """The `dataset` field: its shape and size (see the module docstring)."""

    required: bool = True
    missing: str = ("needs calibration data: a list of texts, a dataset name ('wikitext2', 'c4'), a Hub dataset "
                    "id (owner/name) or the path of a local .txt/.jsonl file")

    def convert(self, value: Any, name: str) -> Any:
        if isinstance(value, list):
            return self._texts(value, name)
        if not isinstance(value, str):
            raise FieldError(name, "must be a list of texts, a dataset name or a file path")
        if not value.strip() or len(value) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in value):
            raise FieldError(name, f"must be a dataset name, a file path (at most {MAX_NAME_LENGTH} characters, "
                                   "no control characters) or a list of texts")
        if dataset_kind(value) == "file":
            if not value.startswith("/"):
                raise FieldError(name, "a calibration file must be an absolute path")
            return value
        if value not in PAPER_SETS:
            if "/" not in value:
                raise FieldError(name, f"unknown dataset {value[:80]!r}: use one of {', '.join(PAPER_SETS)}, a Hub "
                                       "dataset id (owner/name), a local .txt/.jsonl path, or a list of texts")
            problem = repo_id_problem(value)
            if problem:
                raise FieldError(name, f"a Hub dataset id {problem}")
        return value

    @staticmethod
    def _texts(value: list, name: str) -> list[str]:
        if not value:
            raise FieldError(name, "must not be an empty list")
        if len(value) > MAX_CALIBRATION_TEXTS:
            raise FieldError(name, f"may hold at most {MAX_CALIBRATION_TEXTS} texts")
        for i, t in enumerate(value):
            if not isinstance(t, str):
                raise FieldError(f"{name}.{i}", "must be a string")
        if sum(len(t) for t in value) > MAX_CALIBRATION_CHARS:
            raise FieldError(name, f"the texts may hold at most {MAX_CALIBRATION_CHARS} characters in all")
        if not any(t.strip() for t in value):
            raise FieldError(name, "the texts are all empty")
        # the engine joins the texts with blank lines: count those bytes too
        nbytes = sum(len(t.encode("utf-8", "replace")) for t in value) + 2 * (len(value) - 1)
        if nbytes < MIN_CALIBRATION_TOKENS:
            raise FieldError(name, _too_small(nbytes, "the texts hold"))
        return list(value)

    def value_schema(self) -> dict[str, Any]:
        return {"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH,
             "description": "a dataset name (wikitext2, c4, c4-new), a Hub dataset id or an absolute file path"},
            {"type": "array", "minItems": 1, "maxItems": MAX_CALIBRATION_TEXTS, "items": {"type": "string"},
             "description": "the calibration texts"},
        ]}

    def schema(self) -> dict[str, Any]:
        return {**self.value_schema(), "description": "calibration data (" + self.missing.split(": ", 1)[1] + ")"}


# -- can it be had here? ------------------------------------------------------------------------------


def hub_datasets_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """None when named datasets can be fetched here (the `datasets` library is installed and the hub is not
    switched off), else why not."""
    env = os.environ if environ is None else environ
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` library is not installed here"
    if env.get("HF_DATASETS_OFFLINE") == "1" or env.get("HF_HUB_OFFLINE") == "1":
        return "the hub is switched off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    return None


@dataclass(frozen=True)
class CalibrationSources:
    """Where calibration data may come from, here (the API's host or the engine's)."""

    #: Local calibration files must resolve (symlinks followed) under one of these; empty: none allowed.
    roots: tuple[str, ...] = ()
    #: Dataset names (paper sets or Hub ids) the operator keeps a local copy of: name -> file.
    registered: Mapping[str, str] = field(default_factory=dict)
    #: Asked only for a named dataset without a local copy: None when it can be fetched from a hub here,
    #: else why not.
    hub_problem: Callable[[], str | None] = hub_datasets_problem

    @classmethod
    def here(cls, roots: Iterable[str | os.PathLike] = (), registered: Mapping[str, str] | None = None
             ) -> "CalibrationSources":
        return cls(tuple(str(r) for r in roots), dict(registered or {}))


def check_source(value: Any, sources: CalibrationSources, name: str = "dataset") -> None:
    """FieldError unless the (already valid) `dataset` value can be read with these sources."""
    kind = dataset_kind(value)
    if kind == "texts":
        return
    if kind == "named":
        copy = sources.registered.get(value)
        if copy is not None:
            if not Path(copy).is_file():
                raise FieldError(name, f"the local copy of {value!r} registered on this server is missing")
            return
        problem = sources.hub_problem()
        if problem:
            raise FieldError(name, f"{value!r} would be fetched from a hub, but {problem} and no local copy of it "
                                   f"is registered; {HOW_TO_PASS_TEXT}")
        return
    path = local_file(value, sources.roots, name)
    size = path.stat().st_size
    if size < MIN_CALIBRATION_TOKENS:
        raise FieldError(name, _too_small(size, "the calibration file holds"))


def local_file(value: str, roots: tuple[str, ...], name: str = "dataset") -> Path:
    """The resolved path of a local calibration file under `roots`, or FieldError.

    Roots are checked before existence, so that a path outside them says nothing about whether it exists."""
    if not roots:
        raise FieldError(name, "local calibration files are not allowed here (no allowed roots)")
    try:
        resolved = Path(value).resolve()
    except (OSError, RuntimeError):
        raise FieldError(name, "no such calibration file") from None
    if not any(resolved.is_relative_to(Path(r).resolve()) for r in roots):
        raise FieldError(name, "the calibration file is outside the allowed roots")
    if not resolved.exists():
        raise FieldError(name, "no such calibration file")
    if not resolved.is_file():
        raise FieldError(name, "the calibration file is not a regular file")
    return resolved
