"""AutoAWQ's GEMM checkpoint layout (`version: "gemm"`): which layers it holds, the tensors of one layer, the
config, and the reader that puts a saved checkpoint back into the original architecture.

A quantized Linear `[out, in]` becomes three tensors (AutoAWQ's `WQLinear_GEMM.from_linear`):
  * `qweight` int32 `[in, out / 8]`: the 4-bit codes transposed to `[in, out]`, eight output columns per
    word, column `8c + AWQ_ORDER[i]` at bits `4i` (AWQ's interleaved order, which its GEMM kernel unpacks);
  * `qzeros`  int32 `[in / group_size, out / 8]`: the integer zero points, packed the same way;
  * `scales`  float16 `[in / group_size, out]`;
  * `bias` float16 `[out]` when the layer has one.
A weight is `(code - zero) * scale` per group of `group_size` input channels. Every loader (transformers,
GPTQModel, vLLM, SGLang) assumes whole groups and whole words, so a layer needs `in % group_size == 0` and
`out % 8 == 0`; others stay in float16 and are listed in `modules_to_not_convert`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import load_packed_checkpoint

#: Packed position i of a word holds output column AWQ_ORDER[i] of its run of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: The inverse: output column k of a run sits at packed position AWQ_REVERSE_ORDER[k].
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4
PACK = 32 // BITS
LAYER_TENSORS = ("qweight", "qzeros", "scales")


def stored_float(t: torch.Tensor) -> torch.Tensor:
    """A tensor kept unquantized (embeddings, norms, skipped layers): float16, as AWQ loaders expect."""
    return t.to(torch.float16) if t.is_floating_point() else t


def unsupported_reason(in_features: int, out_features: int, group_size: int) -> str | None:
    """Why the GEMM layout cannot hold a layer of this shape, or None when it can."""
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of group_size {group_size} (AWQ groups are whole)"
    if out_features % PACK:
        return f"out_features {out_features} is not a multiple of {PACK} (qweight packs {PACK} columns per word)"
    return None


def pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """Integer values `[rows, cols]` in [0, 15] -> int32 `[rows, cols / 8]` in AWQ's order."""
    rows, cols = codes.shape
    runs = codes.to(torch.int32).reshape(rows, cols // PACK, PACK)
    out = torch.zeros(rows, cols // PACK, dtype=torch.int32, device=codes.device)
    for i, col in enumerate(AWQ_ORDER):
        out |= runs[:, :, col] << (BITS * i)  # int32 shifts wrap: bit 31 is the sign bit, as AutoAWQ stores it
    return out


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_columns`: int32 `[rows, n]` -> int32 `[rows, 8n]` in natural column order."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(-1) >> shifts) & (2**BITS - 1)  # [rows, n, 8] in packed positions
    return vals[:, :, list(AWQ_REVERSE_ORDER)].reshape(rows, n * PACK)


def pack_layer(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one layer from codes `[out, in]`, scales and integer zeros `[out, in / group_size]`."""
    out = {
        "qweight": pack_columns(codes.t().contiguous()),
        "qzeros": pack_columns(zeros.round().to(torch.int32).t().contiguous()),
        "scales": scales.t().contiguous().to(torch.float16),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def dequantize_layer(tensors: dict[str, torch.Tensor], group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight `[out, in]` from one saved layer's tensors (keys without the module prefix)."""
    codes = unpack_columns(tensors["qweight"])  # [in, out]
    zeros = unpack_columns(tensors["qzeros"])  # [G, out]
    scales = tensors["scales"].float()  # [G, out]
    z = zeros.repeat_interleave(group_size, dim=0)
    s = scales.repeat_interleave(group_size, dim=0)
    return ((codes - z).float() * s).t().contiguous().to(dtype)


def build_quantization_config(cfg: dict[str, Any], *, modules_to_not_convert: list[str] | None) -> dict[str, Any]:
    """config.json["quantization_config"]: what transformers' own `AwqConfig(...).to_dict()` writes for these
    values (in transformers 5 a GPTQConfig subclass: GPTQ's fields ride along, and loaders read `bits`,
    `group_size`, `zero_point`, `version`/`format` and `modules_to_not_convert`), as JSON. Nothing of qaas' own
    is added; what calibrated the model is in the job result."""
    from transformers import AwqConfig

    conf = AwqConfig(bits=cfg["bits"], group_size=cfg["group_size"], zero_point=cfg["zero_point"],
                     version=cfg["version"], modules_to_not_convert=modules_to_not_convert or None)
    return json.loads(json.dumps(conf.to_dict()))  # enums (str subclasses) become plain strings


@torch.no_grad()
def load_saved_weights(model: torch.nn.Module, out_dir: Path, *, group_size: int) -> list[str]:
    """Copy every tensor of a saved AWQ checkpoint into `model`, dequantizing the quantized layers (the scaled
    norms and layers come with it). Returns the names of the dequantized modules."""
    return load_packed_checkpoint(model, out_dir, LAYER_TENSORS,
                                  lambda _module, tensors: dequantize_layer(tensors, group_size))
