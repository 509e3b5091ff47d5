"""Training data: a job's `dataset` / `eval_dataset` value to token sequences, and batches of them.

The value's rules are `qaas.quantization_rules.finetune` (checked at submission and again here). Texts get
the tokenizer's special tokens plus an end-of-sequence token, so that the model learns where an example ends;
chat conversations are rendered with the model's own chat template (a model without one is refused: guessing
a format would train the model on the wrong one). The loss covers every token of an example (padding
excluded), or with `assistant_only_loss` only a conversation's assistant turns. `packing` concatenates all examples and cuts them into full `max_seq_length` sequences, without
padding; otherwise each example is one sequence, truncated to `max_seq_length`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qaas.quantization_rules import finetune as rules
from qaas.quantization_rules.calibration import CalibrationSources, local_file
from qaas.quantization_rules.fields import FieldError

from ..errors import InvalidConfig

#: Held out for evaluation when no eval_dataset is given: this share of the examples (at least one).
HELD_OUT_SHARE = 0.1
MAX_HELD_OUT = 1000


def fingerprint(value: Any) -> str:
    """sha256 of the data as given (the texts, the conversations, the file's bytes or the Hub id)."""
    if isinstance(value, list):
        return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    path = Path(value)
    if path.is_absolute() and path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return hashlib.sha256(str(value).encode()).hexdigest()


def load_examples(value: Any, sources: CalibrationSources, name: str) -> list[Any]:
    """The examples (texts, or conversations) of a valid dataset value, read from wherever they live."""
    try:
        value = rules.TrainingData(required=True).check(value, name)
        rules.check_data_source(value, sources, name)
    except FieldError as exc:
        raise InvalidConfig(exc.message, field=exc.field) from None
    kind = rules.data_kind(value)
    if kind in ("texts", "chat"):
        return list(value)
    if kind == "file":
        path = local_file(value, sources.roots, name)
        return _read_file(path, name)
    return _read_hub(value, sources, name)


def _row_example(row: Any, where: str, name: str) -> Any:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        try:
            return rules.TrainingData(required=True).check([row["messages"]], name)[0]
        except FieldError as exc:
            raise InvalidConfig(f"{where}: {exc.message}", field=name) from None
    raise InvalidConfig(f"{where}: a row must hold a 'text' string or a 'messages' list", field=name)


def _read_file(path: Path, name: str) -> list[Any]:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".txt":
        examples = [block.strip() for block in text.split("\n\n") if block.strip()]
    else:
        examples = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InvalidConfig(f"{path.name} line {i} is not JSON", field=name) from None
            examples.append(_row_example(row, f"{path.name} line {i}", name))
    if not examples:
        raise InvalidConfig(f"{path.name} holds no examples", field=name)
    return examples


def _read_hub(value: str, sources: CalibrationSources, name: str) -> list[Any]:
    copy = sources.registered.get(value)
    if copy is not None:
        return _read_file(Path(copy), name)
    import datasets  # only for a Hub dataset without a local copy

    try:
        ds = datasets.load_dataset(value, split="train")
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is the user's to see
        raise InvalidConfig(f"the Hub dataset {value!r} could not be loaded: {exc}"[:500], field=name) from None
    return [_row_example(row, f"{value} row {i}", name) for i, row in enumerate(ds)]


def split_held_out(examples: list[Any], seed: int) -> tuple[list[Any], list[Any], str]:
    """(train, eval, how): a seeded share of the examples held out; with one example, it is both."""
    if len(examples) < 2:
        return examples, examples, "no eval_dataset and a single example: evaluated on the training example"
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(MAX_HELD_OUT, max(1, round(HELD_OUT_SHARE * len(examples))))
    held = sorted(order[:n])
    keep = sorted(order[n:])
    return ([examples[i] for i in keep], [examples[i] for i in held],
            f"no eval_dataset: {n} of {len(examples)} examples held out (seed {seed})")


class Tokens(list):
    """A token sequence (a list of ids) that may say which of its tokens are loss targets (`targets`, one bool
    per token; None: all of them), so that batching and packing keep the mask with the ids."""

    def __init__(self, ids: list[int], targets: list[bool] | None = None) -> None:
        super().__init__(ids)
        self.targets = targets

    def cut(self, start: int, stop: int) -> "Tokens":
        return Tokens(self[start:stop], None if self.targets is None else self.targets[start:stop])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _assistant_targets(tokenizer: Any, conv: list[dict[str, str]], ids: list[int]) -> list[bool] | None:
    """Which tokens of the rendered conversation are the assistant's turns: each turn is the difference
    between the conversation rendered up to it (with the generation prompt) and through it. None when the
    template does not render prefixes as prefixes of the whole (the loss then covers every token)."""
    targets = [False] * len(ids)
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        start = len(_chat_ids(tokenizer, conv[:i], generation_prompt=True)) if i else 0
        through = _chat_ids(tokenizer, conv[:i + 1])
        if through != ids[:len(through)] or start > len(through):
            return None
        targets[start:len(through)] = [True] * (len(through) - start)
    return targets if any(targets) else None


def tokenize(tokenizer: Any, examples: list[Any], *, max_seq_length: int, packing: bool, name: str,
             assistant_only_loss: bool = False) -> list[Tokens]:
    """Token sequences of at most max_seq_length tokens (see the module docstring). With assistant_only_loss,
    a conversation's loss covers only its assistant turns (TRL's SFTConfig field of that name)."""
    eos = tokenizer.eos_token_id
    seqs: list[Tokens] = []
    for ex in examples:
        if isinstance(ex, str):
            ids = tokenizer(ex, add_special_tokens=True)["input_ids"]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            seq = Tokens(ids)
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidConfig("the model has no chat template, so conversations cannot be rendered; pass "
                                    "texts instead", field=name)
            ids = _chat_ids(tokenizer, ex)
            seq = Tokens(ids, _assistant_targets(tokenizer, ex, ids) if assistant_only_loss else None)
        if len(seq) >= 2:
            seqs.append(seq)
    if packing:
        flat = Tokens([t for s in seqs for t in s], None if all(s.targets is None for s in seqs) else
                      [m for s in seqs for m in (s.targets or [True] * len(s))])
        seqs = [flat.cut(i, i + max_seq_length) for i in range(0, len(flat), max_seq_length)]
        seqs = [s for s in seqs if len(s) >= 2]
    else:
        seqs = [s.cut(0, max_seq_length) for s in seqs]
    if not seqs:
        raise InvalidConfig("the data holds no example of at least two tokens", field=name)
    return seqs


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(seqs: list[list[int]], pad_id: int) -> Batch:
    """Right-padded batch; padding (and tokens a `Tokens` marks as no target) is masked out of the loss (-100),
    padding out of attention."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
        chosen = getattr(s, "targets", None)
        targets[i, :len(s)] = torch.tensor(chosen, dtype=torch.bool) if chosen is not None else True
    labels = ids.masked_fill(~targets, -100)
    return Batch(ids, mask, labels)


def epoch_batches(seqs: list[list[int]], batch_size: int, seed: int, epoch: int, pad_id: int) -> list[Batch]:
    """One epoch's micro-batches in a seeded order that depends only on (seed, epoch): a resumed attempt
    sees the same batches as the attempt it continues."""
    order = list(range(len(seqs)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [collate([seqs[j] for j in order[i:i + batch_size]], pad_id) for i in range(0, len(order), batch_size)]
