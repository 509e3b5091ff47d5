"""bitsandbytes-compatible 4-bit (NF4 / FP4) blockwise quantization, byte-exact with bitsandbytes 0.50.

Public API: ``QuantState4bit``, ``quantize_4bit``, ``dequantize_4bit``.

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
import warnings
from dataclasses import dataclass

import torch

from . import codebooks as cb

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
# validation / dispatch


def _check_backend(backend: str) -> None:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    _check_backend(backend)
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"


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
# torch references

_RCP_CODE = """
template <typename T> T qaas_rcp_approx_ftz(T x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(static_cast<float>(x)));
    return static_cast<T>(r);
}
"""
_rcp_fn: list = []


def _rcp_cuda_ref(a: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA ``1.0f / a`` (MUFU.RCP, rcp.approx.ftz.f32) for float32 `a`. On a CUDA tensor through
    torch's jiterator (NVRTC, inline PTX); elsewhere the IEEE quotient (the CPU emulation of the CUDA rules)."""
    if a.is_cuda:
        if not _rcp_fn:
            try:
                fn = torch.cuda.jiterator._create_jit_fn(_RCP_CODE)
                fn(torch.ones(1, device=a.device))
                _rcp_fn.append(fn)
            except Exception as e:  # pragma: no cover - depends on NVRTC being usable
                warnings.warn(f"jiterator unavailable ({e}); the CUDA torch reference uses the IEEE reciprocal")
                _rcp_fn.append(None)
        if _rcp_fn[0] is not None:
            return _rcp_fn[0](a.contiguous())
    return 1.0 / a


def _codes_cuda_ref(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """CUDA decision trees, as counts over the sorted float32 thresholds (NaN -> 0)."""
    thr = torch.tensor(cb.cuda_4bit_thresholds(quant_type), dtype=torch.float32, device=scaled.device)
    if quant_type == "nf4":
        return (scaled.unsqueeze(-1) > thr).sum(-1).to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8) * 8
    c = (scaled.abs().unsqueeze(-1) > thr).sum(-1)
    leaf = torch.tensor(cb.FP4_CUDA_LEAF, dtype=torch.uint8, device=scaled.device)
    return leaf[c] | sign


def _quantize_4bit_codes_ref(x: torch.Tensor, blocksize: int, quant_type: str, flavor: str):
    """Returns (packed uint8 [ceil(n/2), 1], absmax float32 [n_blocks])."""
    a = x.reshape(-1).float()
    n = a.numel()
    nb = -(-n // blocksize)
    rem = n % blocksize
    full = n - rem
    if flavor == "cpu":
        # bitsandbytes/backends/default/ops.py quantize_4bit, step for step
        bounds, order = cb.cpu_4bit_bounds(quant_type, a.device)
        blocks = full // blocksize
        a_com = a[:full].reshape(blocks, blocksize)
        absmax = a_com.abs().max(dim=-1)[0]
        scaled = torch.clamp(a_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        if rem:
            am = a[full:].abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.unsqueeze(0)])
            scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, bounds, out_int32=True)
        if quant_type != "nf4":
            q = order[q]
        q8 = q.to(torch.uint8)
    else:
        padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=a.device)
        padded[:n] = a
        blocks = padded.view(nb, blocksize)
        absmax = blocks.abs().amax(dim=1)
        inv = _rcp_cuda_ref(absmax)  # rcp(0) = inf -> 0*inf = NaN -> code 0, as on CUDA
        scaled = (blocks * inv[:, None]).reshape(-1)
        q8 = _codes_cuda_ref(scaled, quant_type)[: n + (n % 2)]
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    return packed, absmax


def _dq8_cuda_ref(a: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """csrc dQuantize<0>: binary search over the 256-entry map, midpoint rule. a: normalised float32 values."""
    pivot = torch.full_like(a, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(a, -1.0)
    upper = torch.full_like(a, 1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = a > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    gt = a > val
    mid_up = (upper + val) * 0.5
    mid_lo = (lower + val) * 0.5
    r = torch.where(gt, torch.where(a > mid_up, upper_pivot, pivot), torch.where(a < mid_lo, lower_pivot, pivot))
    return r.to(torch.uint8)


def _double_quant_ref(absmax: torch.Tensor, flavor: str):
    """bitsandbytes: offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256) with the dynamic map.
    Returns (qabsmax uint8 [nb], offset 0-dim float32 tensor, nested_absmax float32 [ceil(nb/256)])."""
    offset = absmax.mean()
    a = absmax - offset
    nb = a.numel()
    bs = cb.NESTED_BLOCKSIZE
    nnb = -(-nb // bs)
    padded = torch.zeros(nnb * bs, dtype=torch.float32, device=a.device)
    padded[:nb] = a
    blocks = padded.view(nnb, bs)
    nab = blocks.abs().amax(dim=1)
    inv = _rcp_cuda_ref(nab) if flavor == "cuda" else 1.0 / nab
    v = blocks * inv[:, None]
    if flavor == "cpu":
        lut = cb.dynamic_lut(a.device)
        v = torch.where((nab == 0)[:, None], torch.zeros_like(v), v)
        t = (((v.clamp(-1.0, 1.0) + 1.0) * 0.5) * 65535.0) + 0.5
        q = lut[t.to(torch.int32).long()]
        q = torch.where((nab == 0)[:, None], torch.zeros_like(q), q)
    else:
        q = _dq8_cuda_ref(v, cb.on_device("dynamic", a.device))
    return q.reshape(-1)[:nb].contiguous(), offset, nab


def _dequantize_4bit_ref(packed: torch.Tensor, state: QuantState4bit) -> torch.Tensor:
    n = math.prod(state.shape)
    absmax = _absmax_f32_ref(state)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = state.code.to(p.device)[q]
    nb = absmax.numel()
    scale = absmax.repeat_interleave(state.blocksize)[:n] if nb * state.blocksize >= n else None
    out = vals * scale
    return out.to(state.dtype).reshape(state.shape)


def _absmax_f32_ref(state: QuantState4bit) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    code8 = state.nested_code
    nab = state.nested_absmax.repeat_interleave(state.nested_blocksize)[: state.absmax.numel()]
    a = code8[state.absmax.long()] * nab
    return a + state._offset_tensor(a.device)


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
    if _use_triton(x, backend):
        from . import bnb4_triton as tk

        packed, absmax, qabsmax, offset_t, nab = tk.quantize_4bit_triton(
            x, blocksize, quant_type, compress_statistics, flavor
        )
    else:
        packed, absmax = _quantize_4bit_codes_ref(x, blocksize, quant_type, flavor)
        if compress_statistics:
            qabsmax, offset_t, nab = _double_quant_ref(absmax, flavor)
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
    if _use_triton(packed, backend):
        from . import bnb4_triton as tk

        return tk.dequantize_4bit_triton(packed, state)
    return _dequantize_4bit_ref(packed, state)
