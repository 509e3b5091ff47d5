"""Which ggml type each tensor of a `model-<TYPE>.gguf` gets: the choice llama.cpp's quantizer makes for that
file type from an F16 file (`llama-quantize F16.gguf OUT.gguf TYPE`), so that our file is the one llama.cpp
would have written.

The rules (read from llama-quant.cpp, formulated here for the types produced):
  * only 2-D tensors whose name ends in "weight" and that are not norms are quantized; the rest keep the
    conversion's type (norms and 1-D tensors F32);
  * the output head, or the token embeddings when the head is tied to them (no output.weight), gets Q6_K in
    every k/legacy file but Q8_0 ones, and Q8_0 when its rows are not whole blocks of the file's type;
  * the mixed recipes (Q4_K_S/M, Q5_K_S/M) keep their base k-quant but give attn_v and ffn_down more bits in
    chosen layers: _M Q6_K in `use_more_bits` layers; Q4_K_S Q5_K in the first four attn_v and the first
    eighth of ffn_down; a 70B model's attn_v Q5_K;
  * a tensor whose rows are not whole blocks of its type falls back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to
    Q8_0), then anything that still does not fit (rows not a multiple of 32) to F16.
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


#: The mixed recipes: file type -> the type of the tensors no rule singles out.
MIXES = {"Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}


def base_type(file_type: str) -> str:
    return MIXES.get(file_type, file_type)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the _M recipes: the first and last eighth, and every third
    layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]


def tensor_types(file_type: str, tensors: list[tuple[str, tuple[int, ...], str]],
                 hparams: dict[str, int] | None = None) -> dict[str, str]:
    """{gguf name: ggml type name} for a file of `file_type`, given (name, numpy shape, conversion type) of
    every tensor in llama.cpp's loader order; `hparams`: n_layer, n_head, n_head_kv (the 70B rule)."""
    if file_type in FLOAT_TYPES:
        return {name: conv for name, _, conv in tensors}
    hp = hparams or {}
    # llama.cpp's LLM_TYPE_70B for the Llama graph: 80 layers with grouped-query attention
    is_70b = hp.get("n_layer") == 80 and hp.get("n_head") != hp.get("n_head_kv")
    default = base_type(file_type)
    tied = not any(name == "output.weight" for name, _, _ in tensors)
    n_attn_v = sum(1 for name, _, _ in tensors if _category(name) == "attn_v")
    n_ffn_down = sum(1 for name, _, _ in tensors if _category(name) == "ffn_down")
    i_attn_v = i_ffn_down = 0
    out: dict[str, str] = {}
    for name, shape, conv in tensors:
        if not quantizable(name, shape):
            out[name] = conv
            continue
        cols = shape[-1]  # ggml's ne[0]: the row length
        t, cat = default, _category(name)
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % block_size(t):
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif cat == "attn_v":
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attn_v, n_attn_v):
                t = "Q6_K"
            elif file_type == "Q4_K_S" and i_attn_v < 4:
                t = "Q5_K"
            if is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            i_attn_v += 1
        elif cat == "ffn_down":
            i, n = i_ffn_down, n_ffn_down
            if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                t = "Q6_K"
            elif file_type == "Q4_K_S" and i < n // 8:
                t = "Q5_K"
            i_ffn_down += 1
        out[name] = _fit(t, cols)
    return out


def loader_order(names: list[str]) -> list[str]:
    """llama.cpp's loader order (its quantizer writes tensors so): blocks by number, names sorted within,
    the tensors outside blocks first."""
    def key(n: str) -> tuple[int, str]:
        layer = int(n.split(".")[1]) if n.startswith("blk.") else -1
        return layer, n
    return sorted(names, key=key)
