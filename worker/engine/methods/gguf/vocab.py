"""The tokenizer as llama.cpp reads it from a GGUF file: `tokenizer.ggml.*`.

SentencePiece (`tokenizer.model`: Llama 2, Mistral, TinyStories): model "llama", pieces with their scores and
piece types, read from the model's protobuf here (no sentencepiece dependency: the file is a flat list of
pieces, and decoding it is a few lines; nothing is executed), then the added tokens of added_tokens.json and
tokenizer_config.json. Special token ids, add_bos/add_eos and the chat template come from `gguf.SpecialVocab`
(the gguf package's reader of tokenizer_config.json / generation_config.json), as llama.cpp's converter takes
them. tokenizer.json-only vocabularies are refused (`read_vocab` says why).
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
    model: str  # "llama": SentencePiece
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
        gguf.SpecialVocab(source_dir, n_vocab=len(self.tokens)).add_to_gguf(writer, quiet=True)


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


def read_vocab(source_dir: Path, config: dict[str, Any]) -> Vocab:
    """The vocabulary of the checkpoint in `source_dir`: its SentencePiece model.

    A checkpoint with only tokenizer.json (Llama 3, SmolLM: byte-level BPE; or a SentencePiece vocabulary
    exported to tokenizer.json) is refused: llama.cpp's converter picks among several readings of such files
    (its Hugging Face Llama vocabulary, or GPT-2 style BPE with a pre-tokenizer it recognises by the hash of a
    test tokenization), and ours is not verified against it yet; a wrong pre-tokenizer would load and
    tokenize silently differently."""
    if (source_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(source_dir, config.get("vocab_size"))
    raise InvalidConfig("GGUF conversion needs the model's SentencePiece tokenizer.model (Llama 2, Mistral, "
                        "TinyStories); tokenizer.json-only vocabularies (Llama 3, SmolLM, byte-level BPE) are not "
                        "converted yet", field="model")
