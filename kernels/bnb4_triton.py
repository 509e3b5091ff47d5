"""Triton kernels of ``qaas.kernels.bnb4`` (the torch references live in bnb4.py).

* ``_quantize4_kernel``: one pass over the weight: per-block absmax, scaling, 4-bit code, nibble packing.
* ``_double_quant_kernel``: reads only the absmax vector (n/blocksize floats): subtract the mean, per-256 absmax,
  8-bit code of the signed dynamic map (CUDA binary search or CPU lookup table).
* ``_dequantize4_kernel``: one pass: unpack, code table, absmax (optionally reconstructed from the double quant),
  cast.

All kernels are launched with ``enable_fp_fusion=False``: bitsandbytes rounds every product and sum separately,
and a fused multiply-add would change the last bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import codebooks as cb

_FLAVOR = {"cuda": 0, "cpu": 1}


@triton.jit
def _tree16(x, thr_ptr):
    """Number of the 15 ascending thresholds t with x > t (a 4-level decision tree; NaN -> 0)."""
    t7 = tl.load(thr_ptr + 7)
    b3 = x > t7
    t2 = tl.where(b3, tl.load(thr_ptr + 11), tl.load(thr_ptr + 3))
    b2 = x > t2
    t1 = tl.where(
        b3,
        tl.where(b2, tl.load(thr_ptr + 13), tl.load(thr_ptr + 9)),
        tl.where(b2, tl.load(thr_ptr + 5), tl.load(thr_ptr + 1)),
    )
    b1 = x > t1
    t0 = tl.where(
        b3,
        tl.where(
            b2,
            tl.where(b1, tl.load(thr_ptr + 14), tl.load(thr_ptr + 12)),
            tl.where(b1, tl.load(thr_ptr + 10), tl.load(thr_ptr + 8)),
        ),
        tl.where(
            b2,
            tl.where(b1, tl.load(thr_ptr + 6), tl.load(thr_ptr + 4)),
            tl.where(b1, tl.load(thr_ptr + 2), tl.load(thr_ptr + 0)),
        ),
    )
    b0 = x > t0
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _tree8(x, thr_ptr):
    """Number of the 7 ascending thresholds t with x > t (3 levels)."""
    b2 = x > tl.load(thr_ptr + 3)
    b1 = x > tl.where(b2, tl.load(thr_ptr + 5), tl.load(thr_ptr + 1))
    t0 = tl.where(
        b2,
        tl.where(b1, tl.load(thr_ptr + 6), tl.load(thr_ptr + 4)),
        tl.where(b1, tl.load(thr_ptr + 2), tl.load(thr_ptr + 0)),
    )
    b0 = x > t0
    return b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _code4(s, thr_ptr, map_ptr, QT: tl.constexpr, FLAVOR: tl.constexpr):
    if QT == 0:  # nf4: same tree on both devices, thresholds differ
        c = _tree16(s, thr_ptr)
    elif FLAVOR == 0:  # fp4, CUDA dQuantizeFP4: sign bit + tree on |x|, leaf c -> c ^ ((c & 2) << 1)
        sign = (s < 0).to(tl.int32) * 8
        c = _tree8(tl.abs(s), thr_ptr)
        c = (c ^ ((c & 2) << 1)) | sign
    else:  # fp4, CPU: bucketize over the sorted table, then the argsort order
        c = tl.load(map_ptr + _tree16(s, thr_ptr))
    return c


@triton.jit
def _quantize4_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    thr_ptr,
    map_ptr,
    n,
    n_blocks,
    BS: tl.constexpr,
    BPP: tl.constexpr,
    QT: tl.constexpr,
    FLAVOR: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * BPP + tl.arange(0, BPP)  # [BPP]
    offs = blk.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]  # [BPP, BS]
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)  # [BPP]
    if FLAVOR == 0:
        inv = tl.math.div_rn(tl.full(am.shape, 1.0, tl.float32), am)  # 1/0 = inf: zero block -> NaN -> code 0
        s = x * inv[:, None]
        am_store = am
    else:
        amc = tl.maximum(am, tl.full(am.shape, 1e-38, tl.float32))
        inv = tl.math.div_rn(tl.full(am.shape, 1.0, tl.float32), amc)
        partial = (blk == n_blocks - 1) & ((n % BS) != 0)
        s = tl.where(partial[:, None], tl.math.div_rn(x, amc[:, None]), x * inv[:, None])
        s = tl.where(inb, s, 0.0)
        am_store = tl.where(partial, amc, am)
    tl.store(absmax_ptr + blk, am_store, mask=blk < n_blocks)
    c = _code4(s, thr_ptr, map_ptr, QT, FLAVOR)
    hi, lo = tl.split(tl.reshape(c, (BPP, BS // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    boffs = blk.to(tl.int64)[:, None] * (BS // 2) + tl.arange(0, BS // 2)[None, :]
    tl.store(packed_ptr + boffs, byte, mask=boffs < (n + 1) // 2)


@triton.jit
def _double_quant_kernel(
    absmax_ptr, offset_ptr, q_ptr, nab_ptr, code_ptr, lut_ptr, nb, FLAVOR: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * 256 + tl.arange(0, 256)
    m = offs < nb
    off = tl.load(offset_ptr)
    a = tl.load(absmax_ptr + offs, mask=m, other=0.0) - off
    a = tl.where(m, a, 0.0)
    nab = tl.max(tl.abs(a), axis=0)
    tl.store(nab_ptr + pid, nab)
    inv = tl.math.div_rn(tl.full(nab.shape, 1.0, tl.float32), nab)
    v = a * inv
    if FLAVOR == 1:
        # csrc cpu_ops.cpp quantize_cpu_impl: lut[(uint16)((clamp(v)+1)*0.5*65535 + 0.5)]; zero block -> 0
        v = tl.where(nab == 0.0, 0.0, v)
        v = tl.minimum(tl.maximum(v, -1.0), 1.0)
        t = ((v + 1.0) * 0.5) * 65535.0 + 0.5
        q = tl.load(lut_ptr + t.to(tl.int32))
        q = tl.where(nab == 0.0, 0, q)
    else:
        # csrc dQuantize<0>: binary search over the 256-entry map, then the midpoint rule
        pivot = tl.full(v.shape, 127, tl.int32)
        upper_pivot = tl.full(v.shape, 255, tl.int32)
        lower_pivot = tl.zeros(v.shape, tl.int32)
        lower = tl.full(v.shape, -1.0, tl.float32)
        upper = tl.full(v.shape, 1.0, tl.float32)
        val = tl.load(code_ptr + pivot)
        for k in tl.static_range(7):
            step = 64 >> k
            gt = v > val
            lower_pivot = tl.where(gt, pivot, lower_pivot)
            lower = tl.where(gt, val, lower)
            upper_pivot = tl.where(gt, upper_pivot, pivot)
            upper = tl.where(gt, upper, val)
            pivot = tl.where(gt, pivot + step, pivot - step)
            val = tl.load(code_ptr + pivot)
        upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
        lower = tl.where(lower_pivot == 0, tl.load(code_ptr + 0), lower)
        gt = v > val
        mid_up = (upper + val) * 0.5
        mid_lo = (lower + val) * 0.5
        q = tl.where(gt, tl.where(v > mid_up, upper_pivot, pivot), tl.where(v < mid_lo, lower_pivot, pivot))
    tl.store(q_ptr + offs, q.to(tl.uint8), mask=m)


@triton.jit
def _round_to_bf16(v):
    # round-to-nearest-even to bfloat16 precision in float32 bits, so that the final cast is exact everywhere
    # (the Triton interpreter truncates when it casts float32 to bfloat16).
    u = v.to(tl.uint32, bitcast=True)
    u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize4_kernel(
    packed_ptr,
    absmax_ptr,
    out_ptr,
    code_ptr,
    code8_ptr,
    nab_ptr,
    offset_ptr,
    n,
    BS: tl.constexpr,
    BLOCK: tl.constexpr,
    NESTED: tl.constexpr,
):
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # byte index
    nbytes = (n + 1) // 2
    m = j < nbytes
    b = tl.load(packed_ptr + j, mask=m, other=0).to(tl.int32)
    blk = (2 * j) // BS
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=m, other=0).to(tl.int32)
        a = tl.load(code8_ptr + qa) * tl.load(nab_ptr + blk // 256, mask=m, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=m, other=0.0)
    hi = tl.load(code_ptr + (b >> 4)) * a
    lo = tl.load(code_ptr + (b & 15)) * a
    v = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
    if out_ptr.dtype.element_ty == tl.bfloat16:
        v = _round_to_bf16(v)
    v = v.to(out_ptr.dtype.element_ty)
    o = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + o, v, mask=o < n)


# ----------------------------------------------------------------------------------------------------------------
# launchers

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


# Tile of the quantize kernel: elements per program and warps (tuned on the H100, see bench/NOTES-bnb.md).
QUANT_TILE = {"elems": 1024, "warps": 4}  # sweep on H100: 1024/4w 412 us vs 2048/4w 488 us (28672x8192)


def _bpp(blocksize: int) -> int:
    return max(1, QUANT_TILE["elems"] // blocksize)


def quantize_4bit_triton(x: torch.Tensor, blocksize: int, quant_type: str, compress_statistics: bool, flavor: str):
    n = x.numel()
    nb = -(-n // blocksize)
    dev = x.device
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=dev)
    absmax = torch.empty(nb, dtype=torch.float32, device=dev)
    thr, mp = _thr_tables(quant_type, flavor, dev)
    bpp = _bpp(blocksize)
    tile = bpp * blocksize
    grid = (triton.cdiv(nb, bpp),)
    _quantize4_kernel[grid](
        x, packed, absmax, thr, mp, n, nb,
        BS=blocksize, BPP=bpp, QT=0 if quant_type == "nf4" else 1, FLAVOR=_FLAVOR[flavor],
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
    _double_quant_kernel[(nnb,)](absmax, offset, q, nab, code8, lut, nb, FLAVOR=_FLAVOR[flavor], num_warps=2,
                                 enable_fp_fusion=False)  # fmt: skip
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
        off = torch.tensor([state.offset], dtype=torch.float32, device=dev)
    else:
        code8 = nab = off = code
    _dequantize4_kernel[grid](
        packed, state.absmax.contiguous(), out, code, code8, nab, off, n,
        BS=state.blocksize, BLOCK=block, NESTED=state.nested, num_warps=8, enable_fp_fusion=False,
    )  # fmt: skip
    return out
