"""bitsandbytes-compatible 4-bit (NF4 / FP4) blockwise quantization, byte-exact with bitsandbytes 0.50.

Public API: ``QuantState4bit``, ``quantize_4bit``, ``dequantize_4bit``. This module is the launcher: it checks the
arguments, then runs the Triton kernels of ``bnb4_triton.py`` (tiles and grid chosen here) or the torch references of
``bnb4_reference.py`` they are tested against, by the one rule of ``qaas.kernels.dispatch.use_triton``.

bitsandbytes quantizes with different arithmetic on its two devices, and we follow the device of the input:

* CUDA tensors follow bitsandbytes' CUDA kernels (csrc ``kQuantizeBlockwise``, built with ``--use_fast_math``):
  ``inv = 1.0f / absmax`` once per block, which is ``MUFU.RCP`` (``rcp.approx.ftz.f32``, not the IEEE quotient),
  ``x * inv`` for every element, the ``dQuantizeNF4`` / ``dQuantizeFP4`` decision trees (``x > t`` against the
  float32 immediates of the compiled kernel; an all-zero block gives NaN and code 0), and for the double
  quantization the same reciprocal and the ``dQuantize`` binary search over the signed dynamic map. The torch
  reference issues ``rcp.approx.ftz.f32`` through torch's jiterator on CUDA tensors; on CPU tensors forced to the
  CUDA rules it uses the IEEE quotient, as the Triton interpreter does. (Flush-to-zero of denormal *inputs*, which
  only bf16/fp32 weights below 1.2e-38 can have, is not emulated.)
* CPU tensors follow bitsandbytes' CPU backend: the default 4-bit op (``x * (1/absmax)`` on full blocks,
  ``x / absmax`` on the partial last block, absmax clamped to 1e-38, ``torch.bucketize`` over float32 midpoints)
  and the native CPU 8-bit quantizer for the double quantization (65536-entry lookup table).

Both the Triton kernels and the torch references implement both rule sets (``flavor="cuda" | "cpu"``), so the
interpreter tests on the CPU check the Triton kernels for both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton

from . import bnb4_reference as R
from . import bnb4_triton as T
from . import codebooks as cb
from .dispatch import interpreting, use_triton

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class QuantState4bit:
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 [n_blocks] with double quant
    code: torch.Tensor  # float32 [16], the NF4/FP4 table
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    dtype: torch.dtype  # dtype of the original weight
    shape: tuple[int, ...]
    offset: float | None = None  # double quant: mean of absmax
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks/256)]
    nested_code: torch.Tensor | None = None  # float32 [256], signed dynamic map
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def _offset_tensor(self, device) -> torch.Tensor:
        """The offset as a float32 [1] tensor on `device`, without a host round trip when it was computed there."""
        t = self.__dict__.get("_offset_dev")
        d = torch.device(device)
        if t is not None and t.device.type == d.type and (d.index is None or t.device.index == d.index):
            return t.reshape(1)
        return torch.tensor([self.offset], dtype=torch.float32, device=device)

    def as_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The entries bitsandbytes' ``QuantState.as_dict(packed=True)`` writes (as Params4bit / Linear4bit save
        them under ``<module>.weight.``), with the same keys, dtypes, shapes and bytes."""
        p = prefix
        out: dict[str, torch.Tensor] = {f"{p}.absmax": self.absmax, f"{p}.quant_map": self.code}
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).strip("torch."),  # what bitsandbytes writes, e.g. "bfloat16"
            "shape": list(self.shape),
        }
        if self.nested:
            out[f"{p}.nested_absmax"] = self.nested_absmax
            out[f"{p}.nested_quant_map"] = self.nested_code.clone()
            meta.update(
                {
                    "nested_blocksize": self.nested_blocksize,
                    "nested_dtype": "float32",
                    "nested_offset": float(self.offset),
                }
            )
        blob = json.dumps(meta).encode("utf-8")
        out[f"{p}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out


def _get_offset(self) -> float | None:
    v = self.__dict__.get("_offset_v")
    if v is None and self.__dict__.get("_offset_dev") is not None:
        v = float(self.__dict__["_offset_dev"].item())  # the one host sync of a double-quantized state
        self.__dict__["_offset_v"] = v
    return v


def _set_offset(self, v) -> None:
    # quantize_4bit hands over the 0-dim device tensor of the mean: reading `.offset` syncs once, later; nothing
    # in quantize_4bit waits for the device.
    if isinstance(v, torch.Tensor):
        self.__dict__["_offset_dev"] = v.detach().reshape(()).to(torch.float32)
        self.__dict__["_offset_v"] = None
    else:
        self.__dict__["_offset_dev"] = None
        self.__dict__["_offset_v"] = None if v is None else float(v)


QuantState4bit.offset = property(_get_offset, _set_offset)  # the dataclass field stays `offset: float | None`


# ----------------------------------------------------------------------------------------------------------------
# argument checks


def _flavor(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "cpu"


def _validate_quantize(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError("x must be a torch.Tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_4bit supports float16, bfloat16 and float32 inputs, got {x.dtype}")
    if blocksize not in cb.BNB_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {cb.BNB_BLOCKSIZES} (as in bitsandbytes 0.50), got {blocksize}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    if x.numel() == 0:
        raise ValueError("x must have at least one element")
    if x.numel() >= 2**31 - 4096:
        raise ValueError("x has too many elements (bitsandbytes indexes with 32-bit ints)")


# ----------------------------------------------------------------------------------------------------------------
# launchers (grid and tile choice for the kernels in bnb4_triton.py)

_FLAVOR = {"cuda": 0, "cpu": 1}


def _use_asm() -> bool:
    """Inline PTX only when Triton compiles (not in the interpreter)."""
    return not interpreting()

_tables: dict = {}


def _thr_tables(quant_type: str, flavor: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (quant_type, flavor, str(device))
    if key not in _tables:
        if flavor == "cuda":
            thr = torch.tensor(cb.cuda_4bit_thresholds(quant_type), dtype=torch.float32)
            mp = torch.arange(16, dtype=torch.int32)
        else:
            mid, order = cb.cpu_4bit_bounds(quant_type, "cpu")
            thr, mp = mid.clone(), order.to(torch.int32)
        _tables[key] = (thr.to(device), mp.to(device))
    return _tables[key]


# Tile of the general quantize kernel (CPU rule set, fp32 inputs, odd lengths): elements per program and warps.
QUANT_TILE = {"elems": 1024, "warps": 4}  # sweep on H100: 1024/4w 412 us vs 2048/4w 488 us (28672x8192)
# NF4 code modes of the fast quantize kernel (bnb4_triton._pairs_tile; all give bitsandbytes' bytes). The bin
# table and popcount modes gather per element from L1 and, through those gathers' layout, move the tile through
# shared memory; the half2 modes use no memory but the rare tie (their docstrings say why that is exact).
FAST_MODES = {
    0: "tree",  # 4-level float32 tree, immediates
    1: "bins",  # 35-entry bin table on s + 3.0, one 8-byte gather
    2: "bins+tree",  # half of the elements each way
    3: "popc",  # popcount of the bins below + 16-entry table
    4: "half2",  # both elements of a word in one packed-f16x2 tree (inline PTX), float32 only on ties
    5: "half2+st",  # half2, and absmax stored from the reduction's layout: no shared memory or barrier at all
    6: "bins+st",  # bins with the gather and the absmax store in inline PTX: the tile keeps one layout
    7: "popc+st",  # popc, the same way
}
# Fast path (CUDA rule set, fp16/bf16, even length): blocks per tile, warps, programs per SM for the persistent
# grid (0: one program per tile), NF4 code mode (FAST_MODES; QAAS_NF4_FAST_MODE overrides the default, so a
# GPU run can pick one without an edit). MODE 6 by default: on the H200 at 28672x8192 it was 191 µs (74 % of copy)
# against MODE 1's 244 µs (58 %), the same bytes and absmax as bitsandbytes (bench/bnb_variants.py). See
# bench/NOTES-bnb.md.
FAST_TILE = {"bpp": 32, "warps": 4, "per_sm": 0, "mode": int(os.environ.get("QAAS_NF4_FAST_MODE", "6"))}
if FAST_TILE["mode"] not in FAST_MODES:
    raise ValueError(f"QAAS_NF4_FAST_MODE must be one of {sorted(FAST_MODES)}, got {FAST_TILE['mode']}")


def _bpp(blocksize: int) -> int:
    return max(1, QUANT_TILE["elems"] // blocksize)


def nf4_bin_table() -> np.ndarray:
    """int64 [35], (base << 32) | bits(thr) per entry: entry 0 for s < -1, entry b + 1 for the bin
    [-1 + b/16, -1 + (b+1)/16) (b = 32: s >= 1), entry 34 for NaN. base = number of NF4 CUDA thresholds below the
    bin, thr = the threshold inside the bin (+inf if none)."""
    thr = np.array(cb.NF4_CUDA_THRESHOLDS, dtype=np.float64)
    out = np.zeros(35, dtype=np.int64)
    for i in range(35):
        b = i - 1
        if b == -1 or b == 33:  # s < -1, NaN (all-zero block): code 0
            base, t = 0, np.inf
        else:
            lo, hi = -1.0 + b / 16, (-1.0 + (b + 1) / 16) if b < 32 else np.inf
            inside = thr[(thr >= lo) & (thr < hi)]
            assert len(inside) <= 1
            # no threshold within 1e-3 of a bin edge: s + 3.0 rounds by < 2.4e-7 and cannot cross a threshold
            assert np.all(np.abs(thr - lo) > 1e-3)
            base = int((thr < lo).sum())
            t = inside[0] if len(inside) else np.inf
        bits = int(np.array([t], dtype=np.float32).view(np.uint32)[0])
        out[i] = (base << 32) | bits
    return out


def nf4_popc_tables() -> tuple[int, np.ndarray]:
    """(MASK, thr16) of the MODE 3 NF4 code: bit b of MASK set when the bin [-1 + b/16, -1 + (b+1)/16)
    (b = 0..31) holds an NF4 CUDA threshold (at most one each, none in the end bins, none within 1e-3 of an
    edge); thr16 = the 15 thresholds ascending, float32, then +inf."""
    thr = np.array(cb.NF4_CUDA_THRESHOLDS, dtype=np.float32)
    assert np.all(np.diff(thr) > 0)
    bins = np.floor((thr.astype(np.float64) + 1.0) * 16).astype(np.int64)
    edges = -1.0 + np.arange(33) / 16
    assert len(set(bins.tolist())) == len(bins) and bins.min() > 0 and bins.max() < 31
    assert np.min(np.abs(thr.astype(np.float64)[:, None] - edges[None, :])) > 1e-3
    mask = int(sum(1 << int(b) for b in bins))
    return mask, np.concatenate([thr, np.float32([np.inf])]).astype(np.float32)


def _popc_table(device) -> tuple[int, torch.Tensor]:
    key = ("nf4popc", str(device))
    if key not in _tables:
        mask, thr16 = nf4_popc_tables()
        _tables[key] = (mask, torch.from_numpy(thr16).to(device))
    return _tables[key]


def _bin_table(device) -> torch.Tensor:
    key = ("nf4bins", str(device))
    if key not in _tables:
        _tables[key] = torch.from_numpy(nf4_bin_table()).to(device)
    return _tables[key]


_sm_count: dict = {}


def _sms(device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _sm_count:
        _sm_count[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _sm_count[i]


def fast_path_ok(x: torch.Tensor, flavor: str) -> bool:
    return (
        flavor == "cuda"
        and x.dtype in (torch.float16, torch.bfloat16)
        and x.numel() % 2 == 0
        and x.data_ptr() % 4 == 0
    )


def _launch_fast(x, packed, absmax, blocksize, quant_type, nb):
    cfg = FAST_TILE
    wpb = blocksize // 2
    bpp = max(1, cfg["bpp"] * 64 // blocksize) if blocksize <= 64 else max(1, 2048 // blocksize)
    n_words = x.numel() // 2
    n_tiles = triton.cdiv(nb, bpp)
    per_sm = cfg["per_sm"] if _use_asm() else 0  # the interpreter cannot loop over tl.program_id()
    grid = (min(n_tiles, _sms(x.device) * per_sm),) if per_sm else (n_tiles,)
    tab = _bin_table(x.device)
    mask, thr16 = _popc_table(x.device)
    T.quantize4_pairs_kernel[grid](
        x.reshape(-1).view(torch.int32), packed, absmax, tab, thr16, n_words, nb, n_tiles,
        WPB=wpb, BPP=bpp, IS_BF16=x.dtype == torch.bfloat16, QT=0 if quant_type == "nf4" else 1,
        MODE=cfg["mode"], MASK=mask, USE_ASM=_use_asm(), PERSIST=bool(per_sm),
        num_warps=cfg["warps"], enable_fp_fusion=False,
    )  # fmt: skip


def quantize_4bit_triton(x: torch.Tensor, blocksize: int, quant_type: str, compress_statistics: bool, flavor: str,
                         fast: bool | None = None):  # fmt: skip
    """Returns (packed, absmax, qabsmax, offset (0-dim float32 tensor on x's device), nested_absmax); the last three
    are None without double quant. Nothing here waits for the device."""
    n = x.numel()
    nb = -(-n // blocksize)
    dev = x.device
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(nb, dtype=torch.float32, device=dev)
    if fast is None:
        fast = fast_path_ok(x, flavor)
    if fast:
        _launch_fast(x, packed, absmax, blocksize, quant_type, nb)
    else:
        thr, mp = _thr_tables(quant_type, flavor, dev)
        bpp = _bpp(blocksize)
        tile = bpp * blocksize
        grid = (triton.cdiv(nb, bpp),)
        T.quantize4_kernel[grid](
            x, packed, absmax, thr, mp, n, nb,
            BS=blocksize, BPP=bpp, QT=0 if quant_type == "nf4" else 1, FLAVOR=_FLAVOR[flavor], USE_ASM=_use_asm(),
            num_warps=max(QUANT_TILE["warps"], 8 if tile >= 8192 else 1), enable_fp_fusion=False,
        )  # fmt: skip
    if not compress_statistics:
        return packed, absmax, None, None, None
    offset = absmax.mean()  # the same torch reduction bitsandbytes uses (bit-identical offset)
    nnb = -(-nb // 256)
    q = torch.empty(nb, dtype=torch.uint8, device=dev)
    nab = torch.empty(nnb, dtype=torch.float32, device=dev)
    code8 = cb.on_device("dynamic", dev)
    lut = cb.dynamic_lut(dev) if flavor == "cpu" else code8
    T.double_quant_kernel[(nnb,)](absmax, offset, q, nab, code8, lut, nb, FLAVOR=_FLAVOR[flavor], USE_ASM=_use_asm(),
                                 num_warps=2, enable_fp_fusion=False)  # fmt: skip
    return packed, absmax, q, offset, nab


def dequantize_4bit_triton(packed: torch.Tensor, state) -> torch.Tensor:
    n = math.prod(state.shape)
    dev = packed.device
    out = torch.empty(state.shape, dtype=state.dtype, device=dev)
    code = state.code.to(device=dev, dtype=torch.float32).contiguous()
    block = 2048
    grid = (triton.cdiv((n + 1) // 2, block),)
    if state.nested:
        code8 = state.nested_code.to(dev).contiguous()
        nab = state.nested_absmax.to(dev).contiguous()
        off = state._offset_tensor(dev)
    else:
        code8 = nab = off = code
    T.dequantize4_kernel[grid](
        packed, state.absmax.contiguous(), out, code, code8, nab, off, n,
        BS=state.blocksize, BLOCK=block, NESTED=state.nested, num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# public API


def quantize_4bit(
    x: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, QuantState4bit]:
    """packed uint8 [ceil(n/2), 1], byte-identical to bitsandbytes.functional.quantize_4bit(x, blocksize=...,
    quant_type=..., compress_statistics=...) on the same device."""
    _validate_quantize(x, blocksize, quant_type)
    flavor = _flavor(x)
    if use_triton(backend, x):
        packed, absmax, qabsmax, offset_t, nab = quantize_4bit_triton(
            x, blocksize, quant_type, compress_statistics, flavor
        )
    else:
        packed, absmax = R.quantize_4bit_codes_reference(x, blocksize, quant_type, flavor)
        if compress_statistics:
            qabsmax, offset_t, nab = R.double_quant_reference(absmax, flavor)
    code = cb.on_device(quant_type, x.device)
    nested = {}
    if compress_statistics:
        nested = dict(
            offset=offset_t,  # device tensor: no host sync here (QuantState4bit.offset reads it once, lazily)
            nested_absmax=nab,
            nested_code=cb.on_device("dynamic", x.device).clone(),
        )
    state = QuantState4bit(
        absmax=qabsmax if compress_statistics else absmax,
        code=code.clone(),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=x.dtype,
        shape=tuple(x.shape),
        **nested,
    )
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit, *, backend: str = "auto") -> torch.Tensor:
    """Equal to bitsandbytes.functional.dequantize_4bit(packed, bnb_state) (fp32 product code*absmax, then a
    round-to-nearest cast to state.dtype)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    if state.blocksize not in cb.BNB_BLOCKSIZES:
        raise ValueError(f"invalid blocksize {state.blocksize}")
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if state.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {state.dtype}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, expected {(n + 1) // 2} for shape {state.shape}")
    nb = -(-n // state.blocksize)
    if state.absmax.numel() != nb:
        raise ValueError(f"absmax has {state.absmax.numel()} entries, expected {nb}")
    if state.nested and state.absmax.dtype != torch.uint8:
        raise ValueError("with double quant, absmax must be uint8")
    if use_triton(backend, packed):
        return dequantize_4bit_triton(packed, state)
    return R.dequantize_4bit_reference(packed, state)
