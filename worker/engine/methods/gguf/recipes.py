"""Which ggml type each tensor of a `model-<TYPE>.gguf` gets: the choice llama.cpp's quantizer makes for that
file type from an F16 file (`llama-quantize F16.gguf OUT.gguf TYPE`), so that our file is the one llama.cpp
would have written.

The rules (read from llama-quant.cpp, formulated here for the types produced):
  * only 2-D tensors whose name ends in "weight" and that are not norms are quantized; the rest keep the
    conversion's type (norms and 1-D tensors F32);
  * the output head, or the token embeddings when the head is tied to them (no output.weight), gets Q6_K in
    every k/legacy file but Q8_0 ones, and Q8_0 when its rows are not whole blocks of the file's type;
  * a tensor whose rows are not whole blocks of its type falls back: Q6_K to Q8_0, then anything that still
    does not fit (rows not a multiple of 32) to F16.
"""

from __future__ import annotations

from qaas.kernels.gguf import FLOAT_TYPES, block_size

#: llama.cpp's fallback for a type whose block does not divide the rows (before the last resort, F16).
FALLBACK = {"Q6_K": "Q8_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _fit(t: str, cols: int) -> str:
    if cols % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % block_size(t) == 0 else "F16"


def tensor_types(file_type: str, tensors: list[tuple[str, tuple[int, ...], str]]) -> dict[str, str]:
    """{gguf name: ggml type name} for a file of `file_type`, given (name, numpy shape, conversion type) of
    every tensor in llama.cpp's loader order."""
    if file_type in FLOAT_TYPES:
        return {name: conv for name, _, conv in tensors}
    tied = not any(name == "output.weight" for name, _, _ in tensors)
    out: dict[str, str] = {}
    for name, shape, conv in tensors:
        if not quantizable(name, shape):
            out[name] = conv
            continue
        cols = shape[-1]  # ggml's ne[0]: the row length
        t = file_type
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % block_size(t):
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        out[name] = _fit(t, cols)
    return out


def loader_order(names: list[str]) -> list[str]:
    """llama.cpp's loader order (its quantizer writes tensors so): blocks by number, names sorted within,
    the tensors outside blocks first."""
    def key(n: str) -> tuple[int, str]:
        layer = int(n.split(".")[1]) if n.startswith("blk.") else -1
        return layer, n
    return sorted(names, key=key)
