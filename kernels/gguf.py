"""GGUF block quantizers, byte-exact with ggml's own (`ggml_quantize_chunk`, with or without an importance matrix).

`quantize_tensor(x, type_name)` takes float32 rows [rows, cols] (cols a multiple of the type's block: 32, or 256
for the k-quants) and returns the bytes llama.cpp stores for them, uint8 [rows, row bytes], on x's device:
  * F32, F16, BF16: IEEE rounding to nearest even (BF16 as the gguf package rounds it: NaN kept quiet);
  * Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 without an importance matrix: the Triton kernel `legacy_quant_kernel` computes scales and codes, torch packs
    them (nibbles, the fifth bits, halves);
  * Q3_K, Q6_K, IQ4_NL, IQ4_XS (scales, no minimum), with or without an importance matrix: the Triton kernels
    of gguf_triton_symmetric.py compute codes and scales (ggml's searches step by step: sums in element
    order, the coordinate descent element by element), the reference's packers pack them;
  * Q2_K, Q4_K, Q5_K (the affine k-quants: a minimum a sub-block), with or without an importance matrix: the
    Triton kernel `affine_k_quant_kernel` (gguf_triton_affine.py) computes scales, minimums and codes, the
    reference's packers pack them;
  * Q4_0, Q4_1, Q5_0, Q5_1 with an importance matrix (`imatrix`, ggml's quant_weights: ggml's quantize_*_impl
    searches, error weights qw * sqrtf(sigma2 + x^2) with sigma2 the row's mean square): the kernels of
    gguf_triton_legacy_imatrix.py (the rows' sigma2, then make_qx_quants' search for Q4_0 / Q5_0 and
    make_qkx2_quants' for Q4_1 / Q5_1, the jit helpers of the symmetric and affine kernels) compute scales,
    minimums and codes, torch packs them as without one. Q8_0 ignores an importance matrix, as ggml does.
What each rule is and why is in gguf_reference.py. Public functions take `backend="auto" | "triton" | "torch"`
(`qaas.kernels.dispatch.use_triton`).
"""

from __future__ import annotations

import torch
import triton

from . import gguf_reference as R
from . import gguf_triton as T
from . import gguf_triton_affine as TA
from . import gguf_triton_legacy_imatrix as TL
from . import gguf_triton_symmetric as TS
from .dispatch import interpreting, use_triton

FLOAT_TYPES = ("F32", "F16", "BF16")
LEGACY = {"Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_1": T.Q4_1, "Q5_0": T.Q5_0, "Q5_1": T.Q5_1}
TYPES = FLOAT_TYPES + tuple(LEGACY) + ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def block_size(type_name: str) -> int:
    return 1 if type_name in FLOAT_TYPES else R.BLOCK_SIZE[type_name]


def row_bytes(type_name: str, cols: int) -> int:
    if type_name in FLOAT_TYPES:
        return cols * (4 if type_name == "F32" else 2)
    return cols // R.BLOCK_SIZE[type_name] * R.BLOCK_BYTES[type_name]


def round_float(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """x (float32) stored as F32 / F16 / BF16 (uint8 bytes, little endian, [rows, cols * width])."""
    if type_name == "F32":
        v = x.to(torch.float32).view(torch.int32)
    elif type_name == "F16":
        v = x.to(torch.float16).view(torch.int16)
    else:
        # round to nearest even on the top 16 bits; NaNs made quiet (the gguf package's rule)
        bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = torch.isnan(x)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        v = torch.where(nan, (bits >> 16) | 64, rounded).to(torch.int32).to(torch.int16)
    return v.contiguous().view(torch.uint8).reshape(x.shape[0], -1)


def quantize_tensor(x: torch.Tensor, type_name: str, *, imatrix: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """float32 rows [rows, cols] -> the bytes of `type_name` [rows, row_bytes] (see the module docstring);
    `imatrix` [cols]: llama.cpp's importance of each column (ggml's quant_weights), None for none."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"x must be float32 [rows, cols], got {x.dtype} {tuple(x.shape)}")
    if type_name not in TYPES:
        raise ValueError(f"no quantizer for {type_name} (have {', '.join(TYPES)})")
    x = x.contiguous()
    if type_name in FLOAT_TYPES:
        return round_float(x, type_name)
    if x.shape[1] % R.BLOCK_SIZE[type_name]:
        raise ValueError(f"{type_name} needs rows of a multiple of {R.BLOCK_SIZE[type_name]} weights, got {x.shape[1]}")
    if imatrix is not None and imatrix.shape != (x.shape[1],):
        raise ValueError(f"imatrix must hold one value per column ({x.shape[1]}), got {tuple(imatrix.shape)}")
    if type_name == "Q8_0":
        imatrix = None  # ggml's Q8_0 has no use for one
    if type_name in LEGACY and use_triton(backend, x):
        if imatrix is None:
            return _legacy_triton(x, type_name)
        return _legacy_imatrix_triton(x, type_name, imatrix)
    if type_name in TS.TYPES and use_triton(backend, x):
        return TS.quantize(x, type_name, imatrix)
    if type_name in TA.SHAPES and use_triton(backend, x):
        return _affine_triton(x, type_name, imatrix)
    return R.quantize_blocks_reference(x, type_name, imatrix)


def _legacy_triton(x: torch.Tensor, type_name: str) -> torch.Tensor:
    rows = x.shape[0]
    b = x.reshape(-1, R.QK)
    n = b.shape[0]
    q = torch.empty((n, R.QK), dtype=torch.int32, device=x.device)
    d = torch.empty(n, dtype=torch.float32, device=x.device)
    m = torch.empty(n, dtype=torch.float32, device=x.device)
    blocks = 64
    T.legacy_quant_kernel[(triton.cdiv(n, blocks),)](b, q, d, m, n, KIND=LEGACY[type_name], BLOCKS=blocks,
                                                     num_warps=4, enable_fp_fusion=False)
    with_min = type_name in ("Q4_1", "Q5_1")
    return R.pack_legacy(type_name, d, m if with_min else None, q).reshape(rows, -1).contiguous()


#: (on a GPU, in the interpreter) program sizes of the legacy imatrix kernels: rows a program of the sigma2 sums
#: (a lane each), blocks a program of Q4_0 / Q5_0 (a [blocks, 32] tile) and of Q4_1 / Q5_1 (a lane each: 128
#: fills 4 warps); the interpreter's cost is per operation, not per element, so there programs take many more
LEGACY_IMATRIX_BLOCKS = {"rows": (128, 4096), "tile": (32, 256), "lanes": (128, 4096)}


def _legacy_imatrix_triton(x: torch.Tensor, type_name: str, imatrix: torch.Tensor) -> torch.Tensor:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 with an importance matrix: the rows' sigma2, then the scales (and minimums) and
    codes from the kernels of gguf_triton_legacy_imatrix.py; packed as without one."""
    rows, cols = x.shape
    per_row = cols // R.QK
    n = rows * per_row
    dev = x.device
    qw = imatrix.to(device=dev, dtype=torch.float32).contiguous()
    launch = dict(num_warps=4, enable_fp_fusion=False)
    sigma2 = torch.empty(rows, dtype=torch.float32, device=dev)
    lanes = LEGACY_IMATRIX_BLOCKS["rows"][interpreting()]
    TL.row_sigma2_kernel[(triton.cdiv(rows, lanes),)](x, sigma2, rows, COLS=cols, ROWS=lanes, **launch)
    q = torch.empty((n, R.QK), dtype=torch.int32, device=dev)
    d = torch.empty(n, dtype=torch.float32, device=dev)
    m = None
    if type_name in ("Q4_0", "Q5_0"):
        b = LEGACY_IMATRIX_BLOCKS["tile"][interpreting()]
        TL.legacy_qx_kernel[(triton.cdiv(n, b),)](x, qw, sigma2, q, d, n, per_row,
                                                  NMAX=8 if type_name == "Q4_0" else 16, B=b, **launch)
    else:
        m = torch.empty(n, dtype=torch.float32, device=dev)
        b = LEGACY_IMATRIX_BLOCKS["lanes"][interpreting()]
        TL.legacy_qkx_kernel[(triton.cdiv(n, b),)](x, qw, sigma2, q, d, m, n, per_row,
                                                   NMAX=15 if type_name == "Q4_1" else 31, B=b, **launch)
    return R.pack_legacy(type_name, d, m, q).reshape(rows, -1).contiguous()


#: super-blocks a launch of the affine kernel takes at most: keeps its offsets in int32 and bounds the int32
#: codes it writes before packing
AFFINE_CHUNK = 1 << 18


def _affine_triton(x: torch.Tensor, type_name: str, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Q2_K / Q4_K / Q5_K: `affine_k_quant_kernel` computes the scales and codes, the reference's packers pack them."""
    rows, cols = x.shape
    per_row = cols // R.QK_K
    n = rows * per_row
    kind, subs, width, nmax = TA.SHAPES[type_name]
    rmin, rdelta, nstep, use_mad = TA.SEARCH[type_name] if imatrix is None else TA.SEARCH_QW
    qw = None if imatrix is None else imatrix.to(device=x.device, dtype=torch.float32).contiguous()
    q = torch.empty((n, R.QK_K), dtype=torch.int32, device=x.device)
    d = torch.empty(n, dtype=torch.float32, device=x.device)
    dmin = torch.empty(n, dtype=torch.float32, device=x.device)
    ls = torch.empty((n, subs), dtype=torch.int32, device=x.device)
    lm = torch.empty((n, subs), dtype=torch.int32, device=x.device)
    step = max(1, AFFINE_CHUNK // per_row)  # rows a launch
    blocks, warps = TA.program_shape(type_name, interpreting())
    for r0 in range(0, rows, step):
        a, b = r0 * per_row, min(rows, r0 + step) * per_row
        TA.affine_k_quant_kernel[(triton.cdiv(b - a, blocks),)](
            x[r0:r0 + step], x if qw is None else qw, q[a:b], d[a:b], dmin[a:b], ls[a:b], lm[a:b], b - a,
            per_row, KIND=kind, HAS_QW=qw is not None, SB=blocks, S=subs, N=width, NMAX=nmax, RMIN=rmin,
            RDELTA=rdelta, NSTEP=nstep, USE_MAD=use_mad, SIGMA_FACTOR=TA.SIGMA_FACTOR[type_name],
            num_warps=warps, enable_fp_fusion=False)
    if type_name == "Q2_K":
        out = R.pack_q2_k(d, dmin, R.q2_k_scale_bytes(ls, lm), q)
    else:
        out = R.pack_q45_k(type_name, d, dmin, R.pack_k4_scales(ls, lm), q)
    return out.reshape(rows, -1).contiguous()
