"""The evaluation text: which text a job's perplexity before/after is measured on, and the rules of choosing it.

Plain Python (no torch): the API applies the rules at submission, the engine when it evaluates.

Which text, first match wins:
  1. the job's `options.eval_text`: the same kinds of value as a calibration `dataset` (a list of texts, the
     absolute path of a .txt/.jsonl/.json file under the allowed roots, or a dataset name the operator keeps a
     local copy of), so a user evaluates on their own domain text;
  2. the operator's `QAAS_EVAL_TEXT` (a file);
  3. the packaged default: a public-domain slice of Shakespeare shipped inside the package
     (`tinyshakespeare-eval.txt`, provenance and licence in `PROVENANCE.txt` beside it), so evaluation runs
     with no configuration, offline, and gives the same number on every machine for the same model.

Never on the calibration text: a job whose `options.eval_text` is its calibration `dataset` itself is refused
at submission (422 naming `options.eval_text`); beyond that the engine leaves out of the evaluation every window
that shares a run of tokens with the calibration windows actually drawn (`OVERLAP_TOKENS`), so a default text
that the calibration set also contains (say, the whole tinyshakespeare corpus as `dataset`) is measured only on
the passages calibration never saw, and the result says how many windows were left out and why.
Every result records the text's sha256 and where it came from.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from qaas.quantization_rules.calibration import CalibrationSources, Dataset, check_source, dataset_kind, local_file
from qaas.quantization_rules.fields import FieldError

#: The packaged default evaluation text and what the result calls it.
PACKAGED_TEXT = Path(__file__).with_name("tinyshakespeare-eval.txt")
PACKAGED_LABEL = "packaged tinyshakespeare-eval.txt (public domain, qaas/eval_text/PROVENANCE.txt)"
#: An evaluation window sharing this many consecutive tokens with a calibration window is left out. 32 tokens
#: are a sentence or two: far longer than the phrases any two English texts share by chance (GPT-3's
#: contamination check used 13 words), short enough to catch a passage copied into both.
OVERLAP_TOKENS = 32


@lru_cache(maxsize=1)
def packaged_sha256() -> str:
    return hashlib.sha256(PACKAGED_TEXT.read_bytes()).hexdigest()


def check_value(value: Any, name: str = "options.eval_text") -> Any:
    """FieldError unless `value` is a valid evaluation text value (the calibration `dataset` kinds)."""
    try:
        return Dataset(required=False).check(value, name)
    except FieldError as exc:
        raise FieldError(exc.field, exc.message.replace("calibration", "evaluation")) from None


def check_can_be_had(value: Any, sources: CalibrationSources, name: str = "options.eval_text") -> None:
    """FieldError unless the (valid) value can be read here: a file under the roots, a registered copy, ..."""
    try:
        check_source(value, sources, name)
    except FieldError as exc:
        raise FieldError(name, exc.message.replace("calibration", "evaluation")) from None


def is_calibration_text(eval_value: Any, dataset: Any, roots: tuple[str, ...] = ()) -> bool:
    """True when the evaluation value names the calibration data itself (the same texts, the same file after
    resolving links, or the same dataset name)."""
    if eval_value is None or dataset is None:
        return False
    kind = dataset_kind(eval_value)
    if kind != dataset_kind(dataset):
        return False
    if kind == "file":
        try:
            a, b = local_file(eval_value, roots), local_file(dataset, roots)
        except FieldError:
            return eval_value == dataset
        if a == b:
            return True
        try:  # two copies of one file
            return a.stat().st_size == b.stat().st_size and _sha256(a) == _sha256(b)
        except OSError:
            return False
    return eval_value == dataset


def check_not_calibration(eval_value: Any, dataset: Any, roots: tuple[str, ...] = (),
                          name: str = "options.eval_text") -> None:
    if is_calibration_text(eval_value, dataset, roots):
        raise FieldError(name, "is the calibration dataset itself: perplexity measured on the text the model was "
                               "calibrated on says nothing about quality; name another text, or leave it out for "
                               "the packaged default")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
