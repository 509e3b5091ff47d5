"""The tokenizer as llama.cpp reads it from a GGUF file: `tokenizer.ggml.*`.

Two readings, chosen as llama.cpp's converter chooses them:
  * SentencePiece (`tokenizer.model`: Llama 2, Mistral, TinyStories): model "llama", pieces with their scores
    and piece types, read from the model's protobuf here (no sentencepiece dependency: the file is a flat list
    of pieces, and decoding it is a few lines; nothing is executed), then the added tokens of
    added_tokens.json and tokenizer_config.json.
  * byte-level BPE from tokenizer.json (Llama 3, SmolLM, Qwen2/2.5/3, GPT-2): model "gpt2", the vocabulary's
    tokens in id order with their types, the merges, and the pre-tokenizer's llama.cpp name
    (`tokenizer.ggml.pre`, `bpe_pre_tokenizer`).
Special token ids, add_bos/add_eos, the merges and the chat template come from `gguf.SpecialVocab` (the gguf
package's reader of tokenizer.json / tokenizer_config.json / generation_config.json), as the converter takes
them. A SentencePiece vocabulary exported to tokenizer.json only (byte fallback, no tokenizer.model) is refused
(`read_vocab` says why).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from ...errors import InvalidConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# SentencePiece piece types (sentencepiece_model.proto) are numbered as gguf.TokenType: NORMAL 1, UNKNOWN 2,
# CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Vocab:
    model: str  # "llama": SentencePiece; "gpt2": byte-level BPE
    pre: str
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]

    def add_to(self, writer: gguf.GGUFWriter, source_dir: Path, arch: gguf.MODEL_ARCH) -> None:
        llama = arch == gguf.MODEL_ARCH.LLAMA
        if llama:  # the converter's Llama family writes tokenizer_config.json's add_prefix_space first
            prefix_space = _tokenizer_config(source_dir).get("add_prefix_space")
            if prefix_space is not None:
                writer.add_add_space_prefix(prefix_space)
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.model == "gpt2":  # the merges too; special ids are not bounded by the token count here
            special = gguf.SpecialVocab(source_dir, load_merges=True)
        else:
            special = gguf.SpecialVocab(source_dir, n_vocab=len(self.tokens))
        adds = post_processor_adds(source_dir)  # first, in the order the converter's reading finds them
        special.add_special_token = {**adds, **{k: v for k, v in special.add_special_token.items() if k not in adds}}
        special.add_to_gguf(writer, quiet=True)
        if llama and len(self.tokens) == 49152:
            # llama.cpp's converter never adds BOS for Llama-graph vocabularies of 49,152 tokens (its rule for
            # Granite's small models; SmolLM's share the size, and llama.cpp runs them without BOS too)
            writer.add_add_bos_token(False)


def post_processor_adds(source_dir: Path) -> dict[str, bool]:
    """Whether the tokenizer itself adds BOS / EOS, as the converter's gguf-py (newer than the gguf 0.19.0
    release on PyPI, which reads only templates, and lets tokenizer_config.json's add_bos_token / add_eos_token
    override them) reads tokenizer.json's post-processor, step by step: a ByteLevel step adds neither unless
    an earlier step said so; a template adds BOS when its single-sequence form starts with the BOS (or CLS)
    token, EOS when it ends with the EOS token. What the post-processor says wins over tokenizer_config."""
    path = source_dir / "tokenizer.json"
    post = (json.loads(path.read_text(encoding="utf-8")).get("post_processor") if path.is_file() else None) or {}
    config = _tokenizer_config(source_dir)
    adds: dict[str, bool] = {}
    for step in post.get("processors", [post]):
        if step.get("type") == "ByteLevel":
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif step.get("type") == "TemplateProcessing" and len(single := step.get("single") or []) > 1:
            first = single[0].get("SpecialToken", {}).get("id")
            last = single[-1].get("SpecialToken", {}).get("id")
            if first:
                adds["bos"] = first in (config.get("bos_token"), config.get("cls_token"))
            if last:
                adds["eos"] = last == config.get("eos_token")
    return adds


def _tokenizer_config(source_dir: Path) -> dict[str, Any]:
    path = source_dir / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


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
    for key, data in (_tokenizer_config(source_dir).get("added_tokens_decoder") or {}).items():
        i, text = int(key), data["content"]
        if i >= n:
            continue
        types[i], text = _added_token_type(text, data.get("special", False))
        tokens[i], scores[i] = text.encode(), -1000.0
    return Vocab("llama", "default", tokens, scores, types)


def _added_token_type(text: str, special: bool) -> tuple[int, str]:
    """An added token's type, and its text as llama.cpp matches it (added tokens are pre-normalized there)."""
    if special or _looks_special(text):
        return CONTROL, text
    return USER_DEFINED, text.replace("\u2581", " ")  # SentencePiece's space marker, pre-normalized


# -- byte-level BPE (tokenizer.json) ----------------------------------------------------------------------

#: The split patterns of the families' tokenizer.json files (the patterns llama.cpp's pre-tokenizers implement).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
#: llama.cpp's name for each pre-tokenizer it implements that these families use, by the steps tokenizer.json
#: spells (`_pre_steps`) and whether its BPE model ignores merges (llama.cpp's "llama-bpe" does, the others
#: do not): what the converter writes as `tokenizer.ggml.pre` for Llama 3, Qwen2/2.5/3, SmolLM and GPT-2.
PRE_TOKENIZERS: dict[tuple[tuple, bool], str] = {
    ((("split", LLAMA3_PATTERN), ("byte_level", False)), True): "llama-bpe",
    ((("split", QWEN2_PATTERN), ("byte_level", False)), False): "qwen2",
    ((("digits", True), ("byte_level", True)), False): "smollm",
    ((("byte_level", True),), False): "gpt-2",
}


def _pre_steps(pre: dict[str, Any] | None) -> tuple[tuple, ...] | None:
    """tokenizer.json's pre_tokenizer as (kind, parameter) steps, None where a step is not one of those the
    families above use (or has options that change what it splits)."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        steps: list[tuple] = []
        for p in pre.get("pretokenizers") or []:
            inner = _pre_steps(p)
            if inner is None:
                return None
            steps.extend(inner)
        return tuple(steps)
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False):
        return (("byte_level", bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    if (kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert", False)
            and "Regex" in (pre.get("pattern") or {})):
        return (("split", pre["pattern"]["Regex"]),)
    return None


def is_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    model, pre = tokenizer_json.get("model") or {}, _pre_steps(tokenizer_json.get("pre_tokenizer"))
    return (model.get("type") == "BPE" and not model.get("byte_fallback", False) and pre is not None
            and any(kind == "byte_level" for kind, _ in pre))


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """`tokenizer.ggml.pre`: the llama.cpp pre-tokenizer that splits text as this tokenizer.json does.

    llama.cpp's converter recognises a model family by the hash of one test text's token ids, which only the
    family's own published vocabulary reproduces; the name it finds is that of the pre-tokenizer the family's
    tokenizer.json defines. This reads the definition itself, so a vocabulary retrained or extended on a
    family's pre-tokenizer gets the family's name too, and one that splits differently is refused, not
    loaded by llama.cpp with a pre-tokenizer that would silently tokenize otherwise."""
    normalizer = tokenizer_json.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ("NFC",) and not (
            normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise InvalidConfig(f"GGUF: the tokenizer's normalizer ({normalizer.get('type')}) has no equivalent in "
                            "llama.cpp's BPE tokenizer", field="model")
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges", False))
    name = PRE_TOKENIZERS.get((steps, ignore_merges)) if steps is not None else None
    if name is None:
        raise InvalidConfig("GGUF: the tokenizer's pre-tokenizer is not one llama.cpp implements for the converted "
                            "families (Llama 3, Qwen2/2.5/3, SmolLM, GPT-2 byte-level BPE); llama.cpp would "
                            "tokenize its text differently", field="model")
    return name


def _bpe_vocab(source_dir: Path, tokenizer_json: dict[str, Any], vocab_size: int | None) -> Vocab:
    from tokenizers import Tokenizer

    pre = bpe_pre_tokenizer(tokenizer_json)
    tokenizer = Tokenizer.from_file(str(source_dir / "tokenizer.json"))
    by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens") or []}
    n = vocab_size or len(by_id)
    if by_id and max(by_id) >= n:
        raise InvalidConfig(f"GGUF: the tokenizer has ids up to {max(by_id)}, more than the model's vocab_size {n}",
                            field="model")
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:  # a row of the embedding no token uses
            tokens.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
            continue
        text = by_id[i]
        if i in added:
            if not added[i].get("normalized", True):
                text = _as_decoded(tokenizer, text)
            kind, text = _added_token_type(text, bool(added[i].get("special", False)))
        else:
            kind = NORMAL
        tokens.append(text.encode())
        types.append(kind)
    return Vocab("gpt2", pre, tokens, None, types)


def _as_decoded(tokenizer: Tokenizer, text: str) -> str:
    """An added token that the tokenizer does not normalize, as encoding and decoding it gives it back: the
    form llama.cpp compares text against."""
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)


def read_vocab(source_dir: Path, config: dict[str, Any]) -> Vocab:
    """The vocabulary of the checkpoint in `source_dir`: its SentencePiece model where it has tokenizer.model
    (the converter's first choice), else its tokenizer.json's byte-level BPE.

    A tokenizer.json that holds a SentencePiece vocabulary (byte fallback instead of byte-level BPE) without
    its tokenizer.model is refused: the converter reads that one through transformers' slow-tokenizer scores
    (its "hfft" vocabulary), which is not reproduced here."""
    if (source_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(source_dir, config.get("vocab_size"))
    path = source_dir / "tokenizer.json"
    if path.is_file():
        tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
        if is_byte_level_bpe(tokenizer_json):
            return _bpe_vocab(source_dir, tokenizer_json, config.get("vocab_size"))
        raise InvalidConfig("GGUF conversion reads byte-level BPE from tokenizer.json (Llama 3, Qwen, SmolLM) or a "
                            "SentencePiece tokenizer.model (Llama 2, Mistral); this tokenizer.json is neither (a "
                            "SentencePiece vocabulary exported without its tokenizer.model?)", field="model")
    raise InvalidConfig("GGUF conversion needs the model's tokenizer: tokenizer.model (SentencePiece) or "
                        "tokenizer.json (byte-level BPE)", field="model")
