"""An independent reading of AutoAWQ's GEMM layout, for the tests: no code shared with the engine's format.

AutoAWQ's `WQLinear_GEMM.from_linear` packs, for each run of eight output columns, column
`ORDER_MAP[i]` of the run into bits 4i..4i+3 of one int32 word; `qweight` is `[in, out / 8]`, `qzeros`
`[in / group_size, out / 8]`, `scales` `[in / group_size, out]`; the weight is `(code - zero) * scale`.
"""

from __future__ import annotations

import torch

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing loop, as written there: int values `[rows, cols]` -> int32 `[rows, cols / 8]`."""
    values = values.to(torch.int32)
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int32)
    for col in range(values.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + ORDER_MAP[i]] << (i * 4)
    return packed


def autoawq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Each nibble put back at the column the packing loop took it from."""
    rows, words = packed.shape
    out = torch.empty(rows, words * 8, dtype=torch.int32)
    for col in range(words):
        for i in range(8):
            out[:, col * 8 + ORDER_MAP[i]] = (packed[:, col] >> (i * 4)) & 0xF
    return out


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Weight `[out, in]` (float32) of one saved AWQ GEMM layer."""
    codes = autoawq_unpack(qweight).float()  # [in, out]
    zeros = autoawq_unpack(qzeros).float()  # [G, out]
    group_size = qweight.shape[0] // qzeros.shape[0]
    g = torch.arange(qweight.shape[0]) // group_size
    return ((codes - zeros[g]) * scales.float()[g]).t().contiguous()


def dequantized_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors with every AWQ layer replaced by its float weight (and bias), others as stored."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            m = name[: -len(".qweight")]
            out[m + ".weight"] = dequantize(t, tensors[m + ".qzeros"], tensors[m + ".scales"])
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = t.float()
    return out


def rtn_asym(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Plain round-to-nearest on AWQ's grid (asymmetric, 4-bit, per group): the baseline AWQ must beat."""
    rows, cols = w.shape
    wg = w.float().reshape(rows, cols // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, 15)
    return ((q - zero) * scale).reshape(rows, cols)
