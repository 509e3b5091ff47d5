"""Triton kernels of ``qaas.kernels.bnb4`` (launched there; the torch references are in bnb4_reference.py).

* ``quantize4_kernel``: one pass over the weight: per-block absmax, scaling, 4-bit code, nibble packing.
* ``double_quant_kernel``: reads only the absmax vector (n/blocksize floats): subtract the mean, per-256 absmax,
  8-bit code of the signed dynamic map (CUDA binary search or CPU lookup table).
* ``dequantize4_kernel``: one pass: unpack, code table, absmax (optionally reconstructed from the double quant),
  cast.

All kernels are launched with ``enable_fp_fusion=False``: bitsandbytes rounds every product and sum separately,
and a fused multiply-add would change the last bit.

bitsandbytes' CUDA library is built with ``--use_fast_math``: its ``1.0f / absmax`` is ``MUFU.RCP``
(``rcp.approx.ftz.f32``, not the IEEE quotient; read off the sm_90 SASS of kQuantizeBlockwise). Compiled, our CUDA
rule set issues the same instruction through inline PTX; in the Triton interpreter (CPU tests) there is no PTX, and
the CUDA rule set falls back to the IEEE quotient (the torch reference does the same on CPU tensors).

* ``quantize4_pairs_kernel``: the fast path for CUDA tensors (fp16/bf16, even length): the weight is read as
  32-bit words (an element pair = one output byte), [BPP, blocksize/2] words per tile with 16-byte loads, the row
  max over both halves, and the byte is ``(code(lo) << 4) | code(hi)`` in the same thread: no reshape/split, no
  shared memory but the warp shuffles of the row max. NF4 codes come from a 34-bin table on ``s + 3.0`` (one
  8-byte gather from L1 + one compare per element) instead of a 4-level tree (15 ALU ops per element); MODE 3
  (``_nf4_popc``): the bin's count of lower thresholds by a popcount of a 32-bit mask and one 4-byte gather from
  a 16-entry table (one cache line), lighter on the L1 pipe. Compiled, both gathers also cost a layout change:
  Triton gives the gather its own thread order, so s0/s1 go to it and the bytes come back through shared memory
  (3 conversions and barriers per tile; most of the shared-memory traffic and barrier stalls that Nsight
  Compute shows). MODEs 4 and 5 (``_nf4_half2_byte``): both elements of a word through one packed-f16x2 tree
  in inline PTX, no memory but for the rare tie (rn16(s) equal to a float16 threshold: float32 decision with
  one gather, skipped by the warps without a tie); MODE 5 also stores absmax from the reduction's layout, so
  the tile never touches shared memory. MODE 6: MODE 1's table with its gather (and the absmax store) in
  inline PTX, which keeps the tile in one layout: no shared memory, and the fewest instructions; MODE 7 the
  same for MODE 3's popcount table.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from . import codebooks as cb
from .triton_common import round_to_bf16

_N0, _N1, _N2, _N3, _N4, _N5, _N6, _N7, _N8, _N9, _N10, _N11, _N12, _N13, _N14 = (
    tl.constexpr(t) for t in cb.NF4_CUDA_THRESHOLDS
)
_F0, _F1, _F2, _F3, _F4, _F5, _F6 = (tl.constexpr(t) for t in cb.FP4_CUDA_THRESHOLDS)


@triton.jit
def _rcp_cuda(a, USE_ASM: tl.constexpr):
    """bitsandbytes' CUDA ``1.0f / a`` under --use_fast_math: MUFU.RCP (rcp.approx.ftz.f32)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        r = tl.math.div_rn(tl.full(a.shape, 1.0, tl.float32), a)
    return r


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
def quantize4_kernel(
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
    USE_ASM: tl.constexpr,
):
    pid = tl.program_id(0)
    blk = pid * BPP + tl.arange(0, BPP)  # [BPP]
    offs = blk.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]  # [BPP, BS]
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)  # [BPP]
    if FLAVOR == 0:
        inv = _rcp_cuda(am, USE_ASM)  # 1/0 = inf: zero block -> NaN -> code 0
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
def _nf4_tree_const(s):
    """dQuantizeNF4 with the thresholds as immediates (cb.NF4_CUDA_THRESHOLD_BITS): 4 compares + 11 selects."""
    b3 = s > _N7
    b2 = s > tl.where(b3, _N11, _N3)
    b1 = s > tl.where(b3, tl.where(b2, _N13, _N9), tl.where(b2, _N5, _N1))
    t0 = tl.where(
        b3,
        tl.where(b2, tl.where(b1, _N14, _N12), tl.where(b1, _N10, _N8)),
        tl.where(b2, tl.where(b1, _N6, _N4), tl.where(b1, _N2, _N0)),
    )
    b0 = s > t0
    return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _fp4_tree_const(s):
    """dQuantizeFP4: sign bit + 3-level tree on |s| with immediates, leaf c -> c ^ ((c & 2) << 1)."""
    a = tl.abs(s)
    b2 = a > _F3
    b1 = a > tl.where(b2, _F5, _F1)
    b0 = a > tl.where(b2, tl.where(b1, _F6, _F4), tl.where(b1, _F2, _F0))
    c = b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    return (c ^ ((c & 2) << 1)) | ((s < 0).to(tl.int32) * 8)


@triton.jit
def _nf4_bins(s, tab_ptr, ASM_GATHER: tl.constexpr = False):
    """NF4 code by table: bin = (bits(s + 3.0) >> 18) - 4095 in [0, 34]: entry 0 holds s < -1 (x * rcp(absmax)
    can undershoot -1 by an ulp: s + 3.0 then drops into the binade below 2), entries 1..33 the bins of 1/16 over
    [-1, 1], entry 34 NaN (all-zero block; clamped). Each bin holds at most one threshold; entry =
    (base code << 32) | threshold bits; code = base + (s > threshold)."""
    u = (s + 3.0).to(tl.uint32, bitcast=True) >> 18
    u = tl.minimum(u, 4095 + 34)
    if ASM_GATHER:
        # the same 8-byte load through inline PTX: Triton then keeps the tile's layout for it instead of giving
        # the gather its own thread order (moving s there and the codes back through shared memory)
        addr = tab_ptr.to(tl.int64, bitcast=True) + (u.to(tl.int64) - 4095) * 8
        e = tl.inline_asm_elementwise("ld.global.nc.b64 $0, [$1];", "=l,l", [addr], dtype=tl.int64, is_pure=True,
                                      pack=1)  # fmt: skip
    else:
        e = tl.load(tab_ptr + (u.to(tl.int32) - 4095))
    thr = e.to(tl.int32).to(tl.float32, bitcast=True)
    return (e >> 32).to(tl.int32) + (s > thr).to(tl.int32)


@triton.jit
def _popc(x, USE_ASM: tl.constexpr):
    """Set bits of a non-negative int32 (POPC compiled; a bit loop in the interpreter)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = x & 1
        for k in tl.static_range(1, 31):
            r += (x >> k) & 1
    return r


@triton.jit
def _nf4_popc(s, thr_ptr, MASK: tl.constexpr, USE_ASM: tl.constexpr, ASM_GATHER: tl.constexpr = False):
    """NF4 code = number of thresholds below s, from the bin b of s (32 bins of 1/16 over [-1, 1], s outside
    clamped into the end bins, which hold no threshold): base = popc(MASK & ((1 << b) - 1)) thresholds lie in
    the bins below (MASK: the bins that hold one, at most one each), and the only other candidate is the next
    threshold, thr[base] (+inf past the last), so code = base + (s > thr[base]). One 4-byte gather from a
    64-byte table (one cache line) instead of `_nf4_bins`' 8-byte gather from 280 bytes: the gathers were what
    kept the L1 pipe 90 % busy. NaN (all-zero block) -> 0."""
    u = (s + 3.0).to(tl.uint32, bitcast=True) >> 18
    b = tl.minimum(tl.maximum(u.to(tl.int32) - 4096, 0), 31)
    base = _popc(MASK & ((1 << b) - 1), USE_ASM)
    if ASM_GATHER:  # as in _nf4_bins: the load in inline PTX keeps the tile's layout
        addr = thr_ptr.to(tl.int64, bitcast=True) + base.to(tl.int64) * 4
        thr = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [addr], dtype=tl.float32,
                                        is_pure=True, pack=1)  # fmt: skip
    else:
        thr = tl.load(thr_ptr + base)
    c = base + (s > thr).to(tl.int32)
    return tl.where(s == s, c, 0)


def _nf4_half2_tree_ptx() -> str:
    """PTX of the packed NF4 tree: $1, $2 = s0, s1 (float32) -> $0 = code(s0) | code(s1) << 16 with bit 4 of a
    half set where rn16(s) equals the threshold it was compared with at some level (a tie: decided in float32
    by `_NF4_H2_FIX_PTX`). Both elements go through one cvt.rn.f16x2 and 4 levels of set.gt.u32.f16x2 (0xFFFF
    per half where greater) with the next threshold picked by lop3 (m ? a : b, LUT 0xCA): about 31 instructions
    for two elements, no memory. Exact: rn16 is monotone, so rn16(s) > T <=> s > t and rn16(s) < T => s < t for
    T = rn16(t); only rn16(s) == T is open, and a binary search visits the successor threshold of every leaf,
    so a tie with T_j shows at some level, with code j = (thresholds below rn16(s)) so far."""
    T = [f"0x{b:04X}{b:04X}" for b in cb.NF4_CUDA_THRESHOLD_F16_BITS]
    L = ["{", ".reg .b32 h, k, l, m3, m2, m1, m0, t, u, v, w, e, f, c;", "cvt.rn.f16x2.f32 h, $2, $1;"]

    def pick(d, m, a, b):
        out = []
        if isinstance(a, int):
            out.append(f"mov.b32 k, {T[a]};")
            a = "k"
        if isinstance(b, int):
            out.append(f"mov.b32 l, {T[b]};")
            b = "l"
        out.append(f"lop3.b32 {d}, {m}, {a}, {b}, 0xCA;")
        return out

    def level(m, t, first=False):
        return [f"set.gt.u32.f16x2 {m}, h, {t};",
                f"set.eq.u32.f16x2 {'e' if first else 'f'}, h, {t};"] + ([] if first else ["or.b32 e, e, f;"])

    L += [f"mov.b32 t, {T[7]};"] + level("m3", "t", first=True)
    L += pick("t", "m3", 11, 3) + level("m2", "t")
    L += pick("u", "m2", 13, 9) + pick("v", "m2", 5, 1) + pick("t", "m3", "u", "v") + level("m1", "t")
    L += pick("u", "m1", 14, 12) + pick("v", "m1", 10, 8) + pick("u", "m2", "u", "v")
    L += pick("v", "m1", 6, 4) + pick("w", "m1", 2, 0) + pick("v", "m2", "v", "w") + pick("t", "m3", "u", "v")
    L += level("m0", "t")
    L += ["and.b32 c, m0, 0x00010001;", "and.b32 e, e, 0x00100010;", "or.b32 c, c, e;"]
    for m, bit in (("m1", 0x00020002), ("m2", 0x00040004), ("m3", 0x00080008)):
        L += [f"mov.b32 k, 0x{bit:08X};", f"lop3.b32 c, {m}, k, c, 0xEA;"]  # c |= m & bit
    L += ["mov.b32 $0, c;", "}"]
    return "\n".join(L)


_NF4_H2_TREE_PTX: tl.constexpr = tl.constexpr(_nf4_half2_tree_ptx())
# Ties (bit 4 of a half of $1) decided in float32: code += s > thr[code], the threshold loaded from the 16-entry
# table at $4 only in warps where some lane has a tie (vote + branch: the load and compare are skipped by ~90 %
# of the warps); then the output byte (code(s0) << 4) | code(s1) in the low 8 bits of $0.
_NF4_H2_FIX_PTX: tl.constexpr = tl.constexpr("\n".join([
    "{", ".reg .b32 c, x, f; .reg .b64 a; .reg .pred p, q, z;",
    "and.b32 x, $1, 0x00100010;", "setp.ne.b32 z, x, 0;", "vote.sync.any.pred z, z, 0xffffffff;",
    "and.b32 c, $1, 0x000F000F;", "@!z bra DONE;",
    # low half: s0 ($2)
    "and.b32 f, x, 0x10;", "setp.ne.b32 p, f, 0;", "and.b32 f, c, 15;", "mul.wide.u32 a, f, 4;", "add.s64 a, a, $4;",
    "mov.b32 f, 0x7F800000;", "@p ld.global.nc.b32 f, [a];", "setp.gt.f32 q, $2, f;", "@q add.u32 c, c, 1;",
    # high half: s1 ($3)
    "setp.gt.u32 p, x, 0xFFFF;", "shr.b32 f, c, 16;", "mul.wide.u32 a, f, 4;", "add.s64 a, a, $4;",
    "mov.b32 f, 0x7F800000;", "@p ld.global.nc.b32 f, [a];", "setp.gt.f32 q, $3, f;", "@q add.u32 c, c, 0x10000;",
    "DONE:", "shl.b32 x, c, 4;", "shr.b32 c, c, 16;", "or.b32 $0, x, c;", "}",
]))

_H0, _H1, _H2, _H3, _H4, _H5, _H6, _H7, _H8, _H9, _H10, _H11, _H12, _H13, _H14 = (
    tl.constexpr(float(v)) for v in np.array(cb.NF4_CUDA_THRESHOLD_F16_BITS, np.uint16).view(np.float16)
)


@triton.jit
def _nf4_half2_code_twin(s, thr16_ptr):
    """Plain-Triton twin of the two PTX blocks for one element (interpreter): h = rn16(s) (exact in float32), the
    tree over the float16 thresholds, ties (h equal to a compared threshold) decided by s > thr[code]."""
    h = s.to(tl.float16).to(tl.float32)
    b3 = h > _H7
    tie = h == _H7
    t = tl.where(b3, _H11, _H3)
    b2 = h > t
    tie = tie | (h == t)
    t = tl.where(b3, tl.where(b2, _H13, _H9), tl.where(b2, _H5, _H1))
    b1 = h > t
    tie = tie | (h == t)
    t = tl.where(
        b3,
        tl.where(b2, tl.where(b1, _H14, _H12), tl.where(b1, _H10, _H8)),
        tl.where(b2, tl.where(b1, _H6, _H4), tl.where(b1, _H2, _H0)),
    )
    b0 = h > t
    tie = tie | (h == t)
    c = b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)
    thr = tl.load(thr16_ptr + c, mask=tie, other=float("inf"))
    return c + (s > thr).to(tl.int32)


@triton.jit
def _nf4_half2_byte(s0, s1, thr16_ptr, USE_ASM: tl.constexpr):
    """NF4 byte (code(s0) << 4) | code(s1) of two float32 scaled values by the packed-half2 tree of
    `_nf4_half2_tree_ptx` (no gather but the rare tie), as int32. In the interpreter (USE_ASM False): the same
    steps in plain Triton: rn16(s) compared with the float16 thresholds (exact in float32), the same tree, the
    same tie rule (tests/kernels/test_bnb4.py checks this twin)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise(_NF4_H2_TREE_PTX, "=r,r,r", [s0, s1], dtype=tl.int32, is_pure=True, pack=1)
        addr = tl.full(s0.shape, 0, tl.int64) + thr16_ptr.to(tl.int64, bitcast=True)
        b = tl.inline_asm_elementwise(_NF4_H2_FIX_PTX, "=r,r,r,r,l", [r, s0, s1, addr], dtype=tl.int32,
                                      is_pure=True, pack=1)  # fmt: skip
    else:
        c0 = _nf4_half2_code_twin(s0, thr16_ptr)
        c1 = _nf4_half2_code_twin(s1, thr16_ptr)
        b = (c0 << 4) | c1
    return b


@triton.jit
def _pairs_tile(w_ptr, packed_ptr, absmax_ptr, tab_ptr, thr16_ptr, tile, n_words, n_blocks,
                WPB: tl.constexpr, BPP: tl.constexpr, IS_BF16: tl.constexpr, QT: tl.constexpr,
                MODE: tl.constexpr, MASK: tl.constexpr, USE_ASM: tl.constexpr):  # fmt: skip
    blk = tile * BPP + tl.arange(0, BPP)
    offs = blk.to(tl.int64)[:, None] * WPB + tl.arange(0, WPB)[None, :]  # word (= output byte) index
    m = offs < n_words
    w = tl.load(w_ptr + offs, mask=m, other=0)
    if IS_BF16:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    am = tl.max(tl.maximum(tl.abs(lo), tl.abs(hi)), axis=1)
    if MODE >= 5 and USE_ASM:
        # st.global from the reduction's own layout (each row's value is held by the lanes of its row, which
        # store the same word to the same address): tl.store of `am` would first move it to a 1-D layout
        # through shared memory, a layout conversion and a barrier per tile
        addr = absmax_ptr.to(tl.int64, bitcast=True) + blk.to(tl.int64) * 4
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.b32 [$1], $3; mov.b32 $0, 0; }", "=r,l,r,r",
            [addr, (blk < n_blocks).to(tl.int32), am], dtype=tl.int32, is_pure=False, pack=1,
        )
    else:
        tl.store(absmax_ptr + blk, am, mask=blk < n_blocks)
    inv = _rcp_cuda(am, USE_ASM)[:, None]
    s0 = lo * inv
    s1 = hi * inv
    if QT == 0 and (MODE == 4 or MODE == 5):
        byte = _nf4_half2_byte(s0, s1, thr16_ptr, USE_ASM)
    elif QT == 0:
        if MODE == 1:
            c0 = _nf4_bins(s0, tab_ptr)
            c1 = _nf4_bins(s1, tab_ptr)
        elif MODE == 7:
            c0 = _nf4_popc(s0, thr16_ptr, MASK, USE_ASM, USE_ASM)
            c1 = _nf4_popc(s1, thr16_ptr, MASK, USE_ASM, USE_ASM)
        elif MODE == 6:
            c0 = _nf4_bins(s0, tab_ptr, USE_ASM)
            c1 = _nf4_bins(s1, tab_ptr, USE_ASM)
        elif MODE == 2:  # half of the elements by the table (L1 pipe), half by the tree (ALU pipes)
            c0 = _nf4_bins(s0, tab_ptr)
            c1 = _nf4_tree_const(s1)
        elif MODE == 3:
            c0 = _nf4_popc(s0, thr16_ptr, MASK, USE_ASM)
            c1 = _nf4_popc(s1, thr16_ptr, MASK, USE_ASM)
        else:
            c0 = _nf4_tree_const(s0)
            c1 = _nf4_tree_const(s1)
    else:
        c0 = _fp4_tree_const(s0)
        c1 = _fp4_tree_const(s1)
    if QT != 0 or (MODE != 4 and MODE != 5):
        byte = (c0 << 4) | c1
    tl.store(packed_ptr + offs, byte.to(tl.uint8), mask=m)


@triton.jit
def quantize4_pairs_kernel(w_ptr, packed_ptr, absmax_ptr, tab_ptr, thr16_ptr, n_words, n_blocks, n_tiles,
                            WPB: tl.constexpr, BPP: tl.constexpr, IS_BF16: tl.constexpr, QT: tl.constexpr,
                            MODE: tl.constexpr, MASK: tl.constexpr, USE_ASM: tl.constexpr,
                            PERSIST: tl.constexpr):  # fmt: skip
    """CUDA rule set, fp16/bf16 input read as int32 words (element pairs). PERSIST: grid-stride loop over tiles."""
    if PERSIST:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _pairs_tile(w_ptr, packed_ptr, absmax_ptr, tab_ptr, thr16_ptr, tile, n_words, n_blocks,
                        WPB, BPP, IS_BF16, QT, MODE, MASK, USE_ASM)  # fmt: skip
    else:
        _pairs_tile(w_ptr, packed_ptr, absmax_ptr, tab_ptr, thr16_ptr, tl.program_id(0), n_words, n_blocks,
                    WPB, BPP, IS_BF16, QT, MODE, MASK, USE_ASM)  # fmt: skip


@triton.jit
def double_quant_kernel(
    absmax_ptr, offset_ptr, q_ptr, nab_ptr, code_ptr, lut_ptr, nb, FLAVOR: tl.constexpr, USE_ASM: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid * 256 + tl.arange(0, 256)
    m = offs < nb
    off = tl.load(offset_ptr)
    a = tl.load(absmax_ptr + offs, mask=m, other=0.0) - off
    a = tl.where(m, a, 0.0)
    nab = tl.max(tl.abs(a), axis=0)
    tl.store(nab_ptr + pid, nab)
    if FLAVOR == 0:
        inv = _rcp_cuda(nab, USE_ASM)
    else:
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
def dequantize4_kernel(
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
        v = round_to_bf16(v)
    v = v.to(out_ptr.dtype.element_ty)
    o = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + o, v, mask=o < n)
