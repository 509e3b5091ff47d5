"""The tokenizer as llama.cpp reads it from a GGUF file: `tokenizer.ggml.*`.

Two vocabularies, the two the Llama family ships:
  * SentencePiece (`tokenizer.model`: Llama 2, Mistral, TinyStories): model "llama", pieces with their scores and
    piece types, read from the model's protobuf here (no sentencepiece dependency: the file is a flat list of
    pieces, and decoding it is a few lines; nothing is executed);
  * byte-level BPE (`tokenizer.json` only: Llama 3, SmolLM, Qwen): model "gpt2", the vocabulary in id order, the
    merges, and the pre-tokenizer llama.cpp must apply (`tokenizer.ggml.pre`), decided from tokenizer.json's
    pre-tokenizer itself.
Special token ids, add_bos/add_eos, merges and the chat template come from `gguf.SpecialVocab` (the gguf
package's reader of tokenizer_config.json / generation_config.json), as llama.cpp's converter takes them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ...errors import InvalidConfig

# SentencePiece piece types (sentencepiece_model.proto) are numbered as gguf.TokenType: NORMAL 1, UNKNOWN 2,
# CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]

    def add_to(self, writer: gguf.GGUFWriter, source_dir: Path) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.model == "llama":
            special = gguf.SpecialVocab(source_dir, n_vocab=len(self.tokens))
        else:
            special = gguf.SpecialVocab(source_dir, load_merges=True)
        special.add_to_gguf(writer, quiet=True)


# -- SentencePiece ---------------------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is bytes for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def sentencepiece_pieces(path: Path) -> list[tuple[bytes, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece model file, in id order."""
    pieces = []
    for number, wire, value in _fields(path.read_bytes()):
        if number != 1 or wire != 2:  # ModelProto.pieces; trainer/normalizer specs are not needed
            continue
        piece, score, kind = b"", 0.0, NORMAL
        for n, w, v in _fields(value):
            if n == 1:
                piece = bytes(v)
            elif n == 2 and w == 5:
                score = struct.unpack("<f", v)[0]
            elif n == 3 and w == 0:
                kind = v
        pieces.append((piece, score, kind))
    return pieces


def _looks_special(text: str) -> bool:
    # added tokens that some models forget to flag special but llama.cpp must treat as control tokens
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _sentencepiece_vocab(source_dir: Path, vocab_size: int | None) -> Vocab:
    pieces = sentencepiece_pieces(source_dir / "tokenizer.model")
    n = vocab_size or len(pieces)
    # ids the model has rows for but the tokenizer does not use: placeholders llama.cpp never emits
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i, (piece, score, kind) in enumerate(pieces[:n]):
        tokens[i], scores[i], types[i] = piece, score, kind
    added = source_dir / "added_tokens.json"
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode(), -1000.0, USER_DEFINED
    tc = source_dir / "tokenizer_config.json"
    if tc.is_file():
        for key, data in (json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            i, text = int(key), data["content"]
            if i >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[i] = CONTROL
            else:
                text = text.replace("\u2581", " ")  # SentencePiece's space marker, pre-normalized
                types[i] = USER_DEFINED
            tokens[i], scores[i] = text.encode(), -1000.0
    return Vocab("llama", "default", tokens, scores, types)


# -- byte-level BPE ------------------------------------------------------------------------------------------


def _bpe_pre(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, from the split regex itself."""
    text = json.dumps(tokenizer.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}" in text:
        return "llama-bpe"  # Llama 3
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}|" in text:
        return "qwen2"
    if '"individual_digits": true' in text and '"ByteLevel"' in text:
        return "smollm"  # SmolLM: digits split one by one, then byte-level
    raise InvalidConfig("GGUF: this byte-level BPE tokenizer's pre-tokenizer is not one llama.cpp's Llama family "
                        "uses (Llama 3, Qwen2, SmolLM)", field="model")


def _bpe_vocab(source_dir: Path, vocab_size: int | None) -> Vocab:
    tokenizer = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise InvalidConfig("GGUF: tokenizer.json is not a BPE tokenizer and there is no tokenizer.model", field="model")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens") or []}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n = max(vocab_size or 0, max(vocab.values()) + 1)
    by_id = {i: text for text, i in vocab.items()}
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
        elif text in added:
            special = added[text].get("special") or _looks_special(text)
            tokens.append(text.encode())
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(text.encode())
            types.append(NORMAL)
    return Vocab("gpt2", _bpe_pre(tokenizer), tokens, None, types)


def read_vocab(source_dir: Path, config: dict[str, Any]) -> Vocab:
    """The vocabulary of the checkpoint in `source_dir` (SentencePiece when tokenizer.model is there)."""
    vocab_size = config.get("vocab_size")
    if (source_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(source_dir, vocab_size)
    if (source_dir / "tokenizer.json").is_file():
        return _bpe_vocab(source_dir, vocab_size)
    raise InvalidConfig("GGUF needs the model's tokenizer (tokenizer.model or tokenizer.json)", field="model")
