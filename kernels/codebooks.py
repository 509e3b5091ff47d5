"""Code tables of bitsandbytes' 4-bit and 8-bit formats, computed exactly as bitsandbytes 0.50 computes them.

* ``nf4_code`` / ``fp4_code``: the 16-entry tables of ``bitsandbytes.functional.get_4bit_type`` (same literals,
  same float32 division by the table's absolute maximum), stored as ``quant_map``.
* ``dynamic_map_signed``: ``bitsandbytes.functional.create_dynamic_map(signed=True)``, the 256-entry table of the
  double quantization (``nested_quant_map``).
* Decision thresholds: bitsandbytes quantizes differently on its two devices, so we keep both rule sets:
  - CUDA kernels (``dQuantizeNF4`` / ``dQuantizeFP4`` in csrc): float literals compared with ``x > t``;
  - CPU / default backend: ``torch.bucketize`` over float32 midpoints of the sorted table (ties go down),
    and the 8-bit CPU kernel quantizes through a 65536-entry lookup table (``build_quantize_lut``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_NF4_VALUES = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# e2m1 values in bit-pattern order (sign in bit 3), normalised by 12 like get_4bit_type does.
_FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

# Thresholds of the CUDA decision trees (csrc kernels: dQuantizeNF4 / dQuantizeFP4), as the float32 bit patterns
# that the compiled sm_90 kernels of bitsandbytes 0.50.2 compare with (read off `cuobjdump -sass
# libbitsandbytes_cuda130.so`: the FSETP.GT.FTZ immediates of kQuantizeBlockwise / kQuantizeBlockwiseSmall).
# Four NF4 literals (indices 0, 8, 12, 14) are one ulp away from the nearest float32 of the decimal literals in the
# csrc source, so the decimal values cannot be used. Ascending.
# NF4: code = number of thresholds t with x > t (equivalent to the tree since the thresholds are sorted).
NF4_CUDA_THRESHOLD_BITS = [
    0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
    0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF, 0x3F5C89D9,
]  # fmt: skip
# FP4: sign = x < 0 (bit 3); c = number of thresholds t with |x| > t; code = leaf[c] | sign.
FP4_CUDA_THRESHOLD_BITS = [0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555]
FP4_CUDA_LEAF = [0, 1, 6, 7, 4, 5, 2, 3]


def _bits_to_f32(bits: list[int]) -> list[float]:
    return [float(v) for v in np.array(bits, dtype=np.uint32).view(np.float32)]


NF4_CUDA_THRESHOLDS = _bits_to_f32(NF4_CUDA_THRESHOLD_BITS)
FP4_CUDA_THRESHOLDS = _bits_to_f32(FP4_CUDA_THRESHOLD_BITS)

# The NF4 CUDA thresholds rounded to the nearest float16 (bit patterns, ascending, all distinct): the packed-half2
# NF4 code of the fast quantize kernel compares rn16(s) with these and decides exactly in float32 only where
# rn16(s) equals one of them (see bnb4_triton._nf4_half2_byte).
NF4_CUDA_THRESHOLD_F16_BITS = [
    int(b) for b in np.array(NF4_CUDA_THRESHOLDS, np.float32).astype(np.float16).view(np.uint16)
]
assert all(np.diff(np.array(NF4_CUDA_THRESHOLD_F16_BITS, np.uint16).view(np.float16).astype(np.float64)) > 0)

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (what a C `...f` literal is)."""
    return float(np.float32(v))


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [16]: identical to ``bitsandbytes.functional.get_4bit_type(quant_type, device)``."""
    if quant_type == "nf4":
        data = _NF4_VALUES
    elif quant_type == "fp4":
        data = _FP4_VALUES
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    t = torch.tensor(data, device="cpu")
    t.div_(t.abs().max())
    return t.to(device) if device is not None else t


def nf4_code(device=None) -> torch.Tensor:
    return get_4bit_code("nf4", device)


def fp4_code(device=None) -> torch.Tensor:
    return get_4bit_code("fp4", device)


def dynamic_map_signed(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """float32 [256]: identical to ``bitsandbytes.functional.create_dynamic_map(signed=True)``."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _cpu_4bit_bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Same computation as bitsandbytes.backends.default.ops._get_4bit_quantize_bounds.
    code = get_4bit_code(quant_type, "cpu")
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints, order


def cpu_4bit_bounds(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints float32 [15], order int64 [16]) of bitsandbytes' default (CPU) 4-bit quantizer."""
    mid, order = _cpu_4bit_bounds_cpu(quant_type)
    return mid.to(device), order.to(device)


def cuda_4bit_thresholds(quant_type: str) -> list[float]:
    """float32-rounded thresholds of the CUDA decision tree, ascending."""
    return [f32(t) for t in (NF4_CUDA_THRESHOLDS if quant_type == "nf4" else FP4_CUDA_THRESHOLDS)]


LUT_SIZE = 65536


@functools.lru_cache(maxsize=8)
def _dynamic_lut_np() -> np.ndarray:
    # csrc/cpu_ops.cpp build_quantize_lut: midpoints 0.5f*(c[i]+c[i+1]); LUT entry i holds the number of
    # midpoints strictly below val_i = -1 + (2*i)/(65535), all in float32.
    c = dynamic_map_signed().numpy().astype(np.float32)
    mid = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    i = np.arange(LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


_lut_cache: dict = {}


def dynamic_lut(device) -> torch.Tensor:
    """uint8 [65536]: the CPU 8-bit quantizer's lookup table for the signed dynamic map."""
    key = str(torch.device(device))
    if key not in _lut_cache:
        _lut_cache[key] = torch.from_numpy(_dynamic_lut_np().copy()).to(device)
    return _lut_cache[key]


_dev_cache: dict = {}


def on_device(name: str, device) -> torch.Tensor:
    """Cached device copies of the tables ("nf4", "fp4", "dynamic")."""
    key = (name, str(torch.device(device)))
    if key not in _dev_cache:
        if name == "dynamic":
            t = dynamic_map_signed()
        else:
            t = get_4bit_code(name, "cpu")
        _dev_cache[key] = t.to(device)
    return _dev_cache[key]
