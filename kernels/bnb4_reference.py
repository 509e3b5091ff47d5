"""Plain-torch references of the bitsandbytes 4-bit kernels (`qaas.kernels.bnb4`): what the Triton kernels are
tested against, and what runs for tensors off CUDA. Each implements both of bitsandbytes' rule sets
(``flavor="cuda" | "cpu"``; see bnb4.py for what differs).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

from . import codebooks as cb

if TYPE_CHECKING:
    from .bnb4 import QuantState4bit

_RCP_CODE = """
template <typename T> T qaas_rcp_approx_ftz(T x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(static_cast<float>(x)));
    return static_cast<T>(r);
}
"""
_rcp_fn: list = []


def rcp_cuda_reference(a: torch.Tensor) -> torch.Tensor:
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


def codes_cuda_reference(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """CUDA decision trees, as counts over the sorted float32 thresholds (NaN -> 0)."""
    thr = torch.tensor(cb.cuda_4bit_thresholds(quant_type), dtype=torch.float32, device=scaled.device)
    if quant_type == "nf4":
        return (scaled.unsqueeze(-1) > thr).sum(-1).to(torch.uint8)
    sign = (scaled < 0).to(torch.uint8) * 8
    c = (scaled.abs().unsqueeze(-1) > thr).sum(-1)
    leaf = torch.tensor(cb.FP4_CUDA_LEAF, dtype=torch.uint8, device=scaled.device)
    return leaf[c] | sign


def quantize_4bit_codes_reference(x: torch.Tensor, blocksize: int, quant_type: str, flavor: str):
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
        inv = rcp_cuda_reference(absmax)  # rcp(0) = inf -> 0*inf = NaN -> code 0, as on CUDA
        scaled = (blocks * inv[:, None]).reshape(-1)
        q8 = codes_cuda_reference(scaled, quant_type)[: n + (n % 2)]
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    return packed, absmax


def dq8_cuda_reference(a: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
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


def double_quant_reference(absmax: torch.Tensor, flavor: str):
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
    inv = rcp_cuda_reference(nab) if flavor == "cuda" else 1.0 / nab
    v = blocks * inv[:, None]
    if flavor == "cpu":
        lut = cb.dynamic_lut(a.device)
        v = torch.where((nab == 0)[:, None], torch.zeros_like(v), v)
        t = (((v.clamp(-1.0, 1.0) + 1.0) * 0.5) * 65535.0) + 0.5
        q = lut[t.to(torch.int32).long()]
        q = torch.where((nab == 0)[:, None], torch.zeros_like(q), q)
    else:
        q = dq8_cuda_reference(v, cb.on_device("dynamic", a.device))
    return q.reshape(-1)[:nb].contiguous(), offset, nab


def dequantize_4bit_reference(packed: torch.Tensor, state: "QuantState4bit") -> torch.Tensor:
    n = math.prod(state.shape)
    absmax = absmax_f32_reference(state)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = state.code.to(p.device)[q]
    nb = absmax.numel()
    scale = absmax.repeat_interleave(state.blocksize)[:n] if nb * state.blocksize >= n else None
    out = vals * scale
    return out.to(state.dtype).reshape(state.shape)


def absmax_f32_reference(state: "QuantState4bit") -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    code8 = state.nested_code
    nab = state.nested_absmax.repeat_interleave(state.nested_blocksize)[: state.absmax.numel()]
    a = code8[state.absmax.long()] * nab
    return a + state._offset_tensor(a.device)
