"""The output directory: staged next to its final place and renamed into place only when complete, so a
killed job never leaves a directory that looks like a finished model.

Holds what every method's output shares: config.json with `quantization_config`, the tokenizer and
generation files carried over from the source, extra JSON files (GPTQ's quantize_config.json), and the
final file list.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .checkpoint import raise_if_out_of_space
from .errors import InvalidConfig

#: Files carried over from the source as they are (when present).
CARRY_OVER_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
#: Globs also carried over (license files, tiktoken vocabularies).
CARRY_OVER_GLOBS = ("LICENSE*", "*.tiktoken")


class StagedOutput:
    """A staging directory `.<name>.partial-<id>` beside `final_dir`; `commit()` renames it into place.

    `final_dir` must not exist or be an empty directory (a finished output is never overwritten).
    `abort()` (or leaving the `with` block with an exception) removes the staging directory.
    """

    def __init__(self, final_dir: str | os.PathLike) -> None:
        self.final_dir = Path(final_dir).absolute()
        if self.final_dir.exists() and (not self.final_dir.is_dir() or any(self.final_dir.iterdir())):
            raise InvalidConfig(f"output directory {self.final_dir} already exists and is not empty", field="out_dir")
        self.path = self.final_dir.parent / f".{self.final_dir.name}.partial-{uuid.uuid4().hex[:12]}"
        try:
            self.final_dir.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except PermissionError:
            raise InvalidConfig(f"cannot create the output directory {self.final_dir} (permission denied)",
                                field="out_dir") from None
        except OSError as exc:
            raise_if_out_of_space(exc, str(self.path))
            raise
        self.committed = False

    def commit(self) -> Path:
        if self.final_dir.exists():
            self.final_dir.rmdir()  # empty (checked in __init__); fails loudly if someone filled it since
        os.replace(self.path, self.final_dir)
        self.committed = True
        return self.final_dir

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()


def write_json(path: Path, data: dict[str, Any]) -> int:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise_if_out_of_space(exc, path.name)
        raise
    return len(text.encode())


def write_config(
    out_dir: Path,
    source_config: dict[str, Any],
    quantization_config: dict[str, Any],
    updates: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json = the source config + `updates` + `quantization_config`."""
    config = dict(source_config)
    config.update(updates or {})
    config["quantization_config"] = quantization_config
    write_json(out_dir / "config.json", config)
    return config


def carry_over_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, generation config and licence files from the source; returns the names copied."""
    names = [n for n in CARRY_OVER_FILES if (source_dir / n).is_file()]
    for pattern in CARRY_OVER_GLOBS:
        names += sorted(p.name for p in source_dir.glob(pattern) if p.is_file() and p.name not in names)
    for n in names:
        try:
            shutil.copyfile(source_dir / n, out_dir / n)  # follows symlinks (Hub cache blobs)
        except OSError as exc:
            raise_if_out_of_space(exc, n)
            raise
    return names


def list_files(directory: Path) -> list[dict[str, Any]]:
    """[{name, size}] of the files in the output directory, sorted by name."""
    return [{"name": p.name, "size": p.stat().st_size} for p in sorted(directory.iterdir()) if p.is_file()]
