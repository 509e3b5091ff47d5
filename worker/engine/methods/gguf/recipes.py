"""Which ggml type each tensor of a `model-<TYPE>.gguf` gets: the choice llama.cpp's quantizer makes for that
file type from an F16 file (`llama-quantize F16.gguf OUT.gguf TYPE`), so that our file is the one llama.cpp
would have written.

The rules (read from llama-quant.cpp's llama_tensor_get_type for a dense Llama-graph model, formulated here
for the types produced):
  * only 2-D tensors whose name ends in "weight" and that are not norms are quantized; the rest keep the
    conversion's type (norms and 1-D tensors F32);
  * the output head, or the token embeddings when the head is tied to them (no output.weight), gets Q6_K in
    every k/legacy/IQ4 file but Q8_0 ones, and Q8_0 when its rows are not whole blocks of the file's type;
  * the mixed recipes keep their base type (`MIXES`) but give some tensors more bits, counted in loader order:
      attn_v       Q2_K: Q4_K with n_head / n_head_kv >= 4, else Q3_K; Q3_K_M: Q5_K in the first two, then
                   Q4_K; Q3_K_L: Q5_K; IQ4_NL/IQ4_XS: Q5_K with n_head / n_head_kv >= 4; Q4_K_M/Q5_K_M:
                   Q6_K in `use_more_bits` layers; Q4_K_S: Q5_K in the first four; a 70B model's Q3_K/Q4_K
                   attn_v Q5_K;
      ffn_down     Q2_K: Q3_K; Q3_K_M: Q5_K in the first n_layer/16 layers, then Q4_K; Q3_K_L: Q5_K;
                   Q4_K_M/Q5_K_M: Q6_K in `use_more_bits` layers; Q4_K_S, and IQ4_NL/IQ4_XS without an
                   importance matrix: Q5_K in the first n_layer/8; Q4_0/Q5_0 with one: Q4_1/Q5_1 there;
      attn_output  Q2_K: Q3_K; Q3_K_M: Q4_K; Q3_K_L: Q5_K;
  * a tensor whose rows are not whole blocks of its type falls back (Q2_K/Q3_K to Q4_0, Q4_K to Q5_0, Q5_K to
    Q5_1, Q6_K to Q8_0, IQ4_XS to IQ4_NL), then anything that still does not fit (rows not a multiple of 32)
    to F16.
"""

from __future__ import annotations

from qaas.kernels.gguf import FLOAT_TYPES, block_size

#: llama.cpp's fallback for a type whose block does not divide the rows (before the last resort, F16).
FALLBACK = {"Q6_K": "Q8_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _fit(t: str, cols: int) -> str:
    if cols % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % block_size(t) == 0 else "F16"


#: The mixed recipes: file type -> the type of the tensors no rule singles out.
MIXES = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
         "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}


def base_type(file_type: str) -> str:
    return MIXES.get(file_type, file_type)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits in the _M recipes: the first and last eighth, and every third
    layer between them."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]


def tensor_types(file_type: str, tensors: list[tuple[str, tuple[int, ...], str]],
                 hparams: dict[str, int] | None = None, *, has_imatrix: bool = False) -> dict[str, str]:
    """{gguf name: ggml type name} for a file of `file_type`, given (name, numpy shape, conversion type) of
    every tensor in llama.cpp's loader order; `hparams`: n_layer, n_head, n_head_kv (the GQA and 70B rules);
    `has_imatrix`: whether the file is quantized with an importance matrix (some recipes then differ)."""
    if file_type in FLOAT_TYPES:
        return {name: conv for name, _, conv in tensors}
    hp = hparams or {}
    # llama.cpp's LLM_TYPE_70B for the Llama graph: 80 layers with grouped-query attention
    is_70b = hp.get("n_layer") == 80 and hp.get("n_head") != hp.get("n_head_kv")
    n_gqa = hp["n_head"] // hp["n_head_kv"] if hp.get("n_head") and hp.get("n_head_kv") else 0
    default = base_type(file_type)
    tied = not any(name == "output.weight" for name, _, _ in tensors)
    n_attn_v = sum(1 for name, _, _ in tensors if _category(name) == "attn_v")
    # llama.cpp counts ffn_down layers as the model's layers (hparams), not as the tensors it sees
    n_ffn_down = hp.get("n_layer") or sum(1 for name, _, _ in tensors if _category(name) == "ffn_down")
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
            t = _attn_v_type(file_type, t, i_attn_v, n_attn_v, n_gqa)
            if is_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            i_attn_v += 1
        elif cat == "ffn_down":
            t = _ffn_down_type(file_type, t, i_ffn_down, n_ffn_down, has_imatrix)
            i_ffn_down += 1
        elif cat == "attn_output":
            t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(file_type, t)
        out[name] = _fit(t, cols)
    return out


def _attn_v_type(file_type: str, t: str, i: int, n: int, n_gqa: int) -> str:
    if file_type == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if file_type == "Q3_K_M":
        return "Q5_K" if i < 2 else "Q4_K"
    if file_type == "Q3_K_L":
        return "Q5_K"
    if file_type in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
        return "Q5_K"
    if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if file_type == "Q4_K_S" and i < 4:
        return "Q5_K"
    return t


def _ffn_down_type(file_type: str, t: str, i: int, n: int, has_imatrix: bool) -> str:
    if file_type == "Q2_K":
        return "Q3_K"
    if file_type == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if file_type == "Q3_K_L":
        return "Q5_K"
    if file_type in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else t
    if file_type in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not has_imatrix:
        return "Q5_K"
    if file_type == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    if file_type in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
        # llama.cpp guards the first ffn_down layers of an imatrix Q4_0/Q5_0 with the types with a minimum
        return "Q4_1" if file_type == "Q4_0" else "Q5_1"
    return t


def loader_order(names: list[str]) -> list[str]:
    """llama.cpp's loader order (its quantizer writes tensors so): blocks by number, names sorted within,
    the tensors outside blocks first."""
    def key(n: str) -> tuple[int, str]:
        layer = int(n.split(".")[1]) if n.startswith("blk.") else -1
        return layer, n
    return sorted(names, key=key)
