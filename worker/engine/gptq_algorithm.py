"""GPTQ on one linear layer: the paper's algorithm, fast.

Same arithmetic as the published loop (the tests' oracle, `tests/support/gptq_paper.py`), organised
for a GPU: per lazy block of 128 columns, one launch computes the scales/zeros of the groups that start
in the block, one launch runs the whole column loop (`qaas.kernels.gptq.gptq_block`), one matmul applies the
lazy update to the remaining columns. The result carries everything a writer needs (the GPTQ v1/v2 format,
compressed-tensors' pack-quantized and int-quantized formats); it lives beside `methods/` because both
methods run it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qaas.kernels import gptq as K
from qaas.kernels.gptq_reference import SUPPORTED_BITS, find_params_reference, quantize_reference, stored_scale

from .hessian import tf32_matmuls


@dataclass
class GPTQResult:
    #: dequantized weight `[out, in]`, float32, original column order: exactly scales[g]*(code - zero[g]), i.e. what
    #: a consumer computes from the stored tensors
    Q: torch.Tensor
    #: integer codes `[out, in]` (int32), original column order
    codes: torch.Tensor
    #: `[G, out]` float32, the stored scales: the column loop's float32 scales rounded to `scale_dtype` (values
    #: representable in it)
    scales: torch.Tensor
    #: `[G, out]` float32 true zero points (integers in [0, 2^bits - 1])
    zeros: torch.Tensor
    #: `[in]` int32: group of each input channel
    g_idx: torch.Tensor
    bits: int
    group_size: int
    #: GPTQ's own loss: sum of squared scaled errors of the column loop (float32 scales; = tr(dW H_damped dW^T) on
    #: the calibration inputs)
    loss: float
    damp_percent: float
    dead_columns: int
    perm: torch.Tensor | None = None
    retries: list[str] = field(default_factory=list)
    #: `[out]` float64: each output row's share of `loss`
    row_loss: torch.Tensor | None = None

    def rows(self, a: int, b: int) -> GPTQResult:
        """The result of output rows a:b alone (GPTQ treats each row on its own given H: see
        `gptq_quantize_stacked`)."""
        row_loss = self.row_loss[a:b] if self.row_loss is not None else None
        return GPTQResult(Q=self.Q[a:b], codes=self.codes[a:b], scales=self.scales[:, a:b].contiguous(),
                          zeros=self.zeros[:, a:b].contiguous(), g_idx=self.g_idx, bits=self.bits,
                          group_size=self.group_size,
                          loss=float(row_loss.sum()) if row_loss is not None else float("nan"),
                          damp_percent=self.damp_percent, dead_columns=self.dead_columns, perm=self.perm,
                          retries=list(self.retries), row_loss=row_loss)


def gar_permutation(diag_h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering (GPTQModel's `act_group_aware`): whole groups ordered by their largest Hessian
    diagonal, columns inside each group by decreasing diagonal. Groups stay intact, so `g_idx` stays
    `i // group_size` and inference needs no reordering. For whole groups this is GPTQModel 7.7's order exactly
    (tests/engine/test_gptq_quality.py runs its functions); a partial last group stays last, its columns sorted
    like any group's (GPTQModel leaves them in their original order)."""
    C = diag_h.numel()
    n_full = C // group_size
    parts = []
    if n_full:
        hv = diag_h[: n_full * group_size].view(n_full, group_size)
        vals, local = torch.sort(hv, dim=1, descending=True, stable=True)
        order = torch.argsort(vals[:, 0], descending=True, stable=True)
        base = (torch.arange(n_full, device=diag_h.device) * group_size).view(-1, 1)
        parts.append((local + base)[order].reshape(-1))
    if C % group_size:
        tail = diag_h[n_full * group_size :]
        parts.append(torch.argsort(tail, descending=True, stable=True) + n_full * group_size)
    return torch.cat(parts)


def _upper_factor_of_inverse(H: torch.Tensor, shift: float) -> tuple[torch.Tensor | None, int]:
    """U upper with U^T U = (H + shift I)^-1, or (None, info) when that is not numerically positive definite.

    The paper computes it as chol(chol_inverse(chol(Hd))), upper: three cuSOLVER calls of ~n^3/3, 2n^3/3 (or
    2n^3 through potrs) and n^3/3 flops. The same factor in two: with J the reversal of rows and columns and
    L L^T = J Hd J (lower Cholesky), R = J L J is upper and Hd = R R^T, so Hd^-1 = R^-T R^-1 and the upper
    factor of Hd^-1 is U = R^-1 = J L^-1 J (unique: positive diagonal). One Cholesky and one triangular
    inverse (`lower_triangular_inverse`); other rounding than the three-step form, same error (tests/kernels,
    bench). At most two n x n temporaries at a time (28672^2 float32 is 3.3 GB: the 70B down_proj)."""
    M = torch.flip(H, (0, 1))  # J H J, a copy; J I J = I, so the damping goes on its diagonal as on H's
    M.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(M)
    del M
    if int(info) != 0:
        return None, int(info)
    Li = lower_triangular_inverse(L)
    del L
    return torch.flip(Li, (0, 1)), 0


#: columns of L^-1 per triangular solve in `lower_triangular_inverse`
INVERSE_BLOCK = 2048


def lower_triangular_inverse(L: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """L^-1 of a lower triangular L, a block of columns at a time: the columns j..j+b of L^-1 are zero above
    row j, so each block solves only the trailing system, L[j:, j:] X = I[j:, j:j+b]. That is n^3/3 flops in
    all, where one solve against the whole identity costs n^3 (cuBLAS's trsm does not skip the zero rows: on the
    H200 it was most of the 70B block's 0.84 s of factorizations). The same forward substitution on the same
    rows, so the same values up to the blocking's rounding."""
    n = L.shape[0]
    block = block or INVERSE_BLOCK
    X = torch.zeros_like(L)
    for j in range(0, n, block):
        e = min(j + block, n)
        rhs = torch.zeros(n - j, e - j, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)
        X[j:, j:e] = torch.linalg.solve_triangular(L[j:, j:], rhs, upper=False)
    return X


def inverse_hessian_factor(
    H: torch.Tensor, damp_percent: float, log: Callable[[str], None] | None = None, max_tries: int = 8
) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor of (H + damp I)^-1, raising damping until H is numerically positive definite."""
    notes: list[str] = []
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    percent = damp_percent
    with tf32_matmuls(False):  # float32 throughout, as the paper's factorization
        for _ in range(max_tries):
            U, _ = _upper_factor_of_inverse(H, percent * mean_diag)
            if U is not None and bool(torch.isfinite(U).all()):
                return U, percent, notes
            msg = f"Hessian not positive definite with damp_percent={percent:g}; retrying with {percent * 10:g}"
            notes.append(msg)
            if log:
                log(msg)
            percent *= 10
    raise RuntimeError("Hessian could not be made positive definite")


@dataclass
class HessianFactor:
    """What GPTQ derives from a Hessian alone, shared by the layers that see the same input (q/k/v, gate/up):
    the dead input channels, the column order, and the upper Cholesky factor of the damped inverse in that
    order. One factorization per distinct Hessian instead of one per layer."""

    dead: torch.Tensor  # bool [in]: channels with H_ii == 0
    perm: torch.Tensor | None
    Hinv: torch.Tensor
    damp_percent: float
    notes: list[str]


def hessian_factor(
    H: torch.Tensor,
    *,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    act_group_aware: bool = False,
    log: Callable[[str], None] | None = None,
) -> HessianFactor:
    """The Hessian half of `gptq_quantize` (same arguments); `H` is not modified."""
    H = H.detach().float().clone()
    C = H.shape[0]
    gs = group_size if group_size != -1 else C
    if desc_act:
        act_group_aware = False
    dead = torch.diag(H) == 0
    if bool(dead.any()):
        H[dead, dead] = 1
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
    elif act_group_aware and group_size != -1:
        perm = gar_permutation(torch.diag(H), gs)
    if perm is not None:
        H = H[perm][:, perm]
    Hinv, used_damp, notes = inverse_hessian_factor(H, damp_percent, log)
    return HessianFactor(dead=dead, perm=perm, Hinv=Hinv, damp_percent=used_damp, notes=notes)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    act_group_aware: bool = False,
    static_groups: bool = False,
    blocksize: int = 128,
    backend: str = "auto",
    log: Callable[[str], None] | None = None,
    factor: HessianFactor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    own_w: bool = False,
) -> GPTQResult:
    """Quantize `W` (`[out, in]`) given the Hessian `H` (`[in, in]`, = 2/n X X^T). Inputs are not modified
    (with `own_w`, W is a float32 copy the caller hands over: the loop works in it instead of a copy of it).

    `factor`: `hessian_factor(H, ...)` with the same group_size, damp_percent, desc_act and act_group_aware,
    when several layers share H (then `H` itself is not read). `scale_dtype`: the dtype the checkpoint stores the
    scales in.

    The column loop (codes and error feedback) uses float32 scales and zeros, as the paper's code and GPTQModel's
    `GPTQ.quantize` do (tests/engine/test_gptq_quality.py compares the codes with GPTQModel's); the scales are
    rounded to `scale_dtype` once, after the loop, and `Q` is computed from those (see there why)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}")
    maxq = 2**bits - 1
    if not own_w:
        W = W.detach().to(torch.float32, copy=True)
    R, C = W.shape
    dev = W.device
    gs = group_size if group_size != -1 else C
    grouped = group_size != -1
    if factor is None:
        factor = hessian_factor(H, group_size=group_size, damp_percent=damp_percent, desc_act=desc_act,
                                act_group_aware=act_group_aware, log=log)

    if not grouped:
        s_all, z_all = find_params_reference(W, bits, sym, round_scale=False)  # before dead columns, as the paper

    dead = factor.dead
    n_dead = int(dead.sum())
    if n_dead:
        W[:, dead] = 0

    def params_over(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales/zeros `[R, ngroups]` of consecutive groups of x's columns (last one may be partial)."""
        ncol = x.shape[1]
        nfull = ncol // gs
        ss, zz = [], []
        if nfull:
            s, z = K.group_params(x[:, : nfull * gs], bits, sym, gs, round_scale=False, backend=backend)
            ss.append(s)
            zz.append(z)
        if ncol % gs:
            s, z = find_params_reference(x[:, nfull * gs :], bits, sym, round_scale=False)
            ss.append(s[:, None])
            zz.append(z[:, None])
        return torch.cat(ss, 1), torch.cat(zz, 1)

    n_groups = math.ceil(C / gs)
    if grouped and static_groups:
        s_static, z_static = params_over(W)

    perm = factor.perm
    if perm is not None:
        W = W[:, perm]
    Hinv, used_damp, notes = factor.Hinv, factor.damp_percent, list(factor.notes)

    # Parameter slots and which slot each (permuted) column uses.
    pos = torch.arange(C, device=dev)
    orig_col = perm if perm is not None else pos
    if not grouped:
        S, Z = s_all[:, None].contiguous(), z_all[:, None].contiguous()
        slot = torch.zeros(C, dtype=torch.int32, device=dev)
    elif static_groups:
        S, Z = s_static.contiguous(), z_static.contiguous()
        slot = (orig_col // gs).to(torch.int32)
    else:
        S = torch.empty((R, n_groups), dtype=torch.float32, device=dev)
        Z = torch.empty_like(S)
        slot = (pos // gs).to(torch.int32)

    # The block kernel writes its results straight into the layer's Q, error and code matrices and reads its
    # columns of W and its Hinv block in place: no per-block copies (the loop is launch-bound: ~300 blocks
    # of 128 columns per transformer block at 8B). The loss is summed once at the end.
    Q = torch.empty_like(W)
    E = torch.empty_like(W)
    codes = torch.empty((R, C), dtype=torch.int32, device=dev)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        if grouped and not static_groups:
            g0 = -(-i1 // gs)  # first group starting at or after i1
            g1 = -(-i2 // gs)  # groups starting before i2
            if g1 > g0:
                # A group's range is read from W at the start of this block, as the paper's loop does.
                sub = W[:, g0 * gs : min(g1 * gs, C)] if (g1 - g0) > 1 else W[:, g0 * gs : min(g0 * gs + gs, C)]
                s, z = params_over(sub)
                S[:, g0:g1] = s[:, : g1 - g0]
                Z[:, g0:g1] = z[:, : g1 - g0]
        # W's columns i1:i2 are not read again after this block (their groups' params are taken above), so
        # the block works on them in place
        _, e1, _ = K.gptq_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], S, Z, slot[i1:i2], maxq, backend=backend,
                                out=(Q[:, i1:i2], E[:, i1:i2], codes[:, i1:i2]))
        if i2 < C:
            # one GEMM that updates W in place (beta 1, alpha -1): no temporary of the product and no separate
            # subtraction pass over the rest of W per block (at 70B most of the column loop's elementwise time)
            W[:, i2:].addmm_(e1, Hinv[i1:i2, i2:], alpha=-1.0)
    row_loss = torch.cat([E[r : r + 2048].double().square().sum(1) for r in range(0, R, 2048)])
    loss = float(row_loss.sum())
    del E

    # The codes stand; the scales are rounded to what the checkpoint stores, and Q is recomputed from the stored
    # scales and zeros instead of the loop's float32-scale weights: Q goes back into the live block, so the later
    # layers' and blocks' calibration inputs (and any evaluation of the in-memory model) see the weights every
    # consumer of the checkpoint computes, not ones that exist nowhere after this function returns.
    S = stored_scale(S, scale_dtype)
    col_s = S[:, slot.long()]
    col_z = Z[:, slot.long()]
    torch.sub(codes, col_z, out=Q)
    Q.mul_(col_s)

    # Back to the original column order and per-group tensors.
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        codes = codes[:, inv]
        col_s = col_s[:, inv]
        col_z = col_z[:, inv]
    if desc_act and grouped and not static_groups:
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    elif grouped:
        g_idx = (pos // gs).to(torch.int32)
    else:
        g_idx = torch.zeros(C, dtype=torch.int32, device=dev)
    scales = torch.zeros((n_groups, R), dtype=torch.float32, device=dev)
    zeros = torch.zeros_like(scales)
    scales[g_idx.long()] = col_s.t()
    zeros[g_idx.long()] = col_z.t()
    return GPTQResult(
        Q=Q,
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        loss=float(loss),
        damp_percent=used_damp,
        dead_columns=n_dead,
        perm=perm,
        retries=notes,
        row_loss=row_loss,
    )


def gptq_quantize_stacked(Ws: list[torch.Tensor], H: torch.Tensor, **options: Any) -> list[GPTQResult]:
    """`gptq_quantize` of several weights that share one Hessian (q/k/v, gate/up) in one column loop.

    GPTQ treats every output row on its own given H (each row's error feedback uses only H's inverse factor,
    the same for all rows; scales and zeros are per row), so the weights stacked row-wise give each weight's own
    result. One loop of C/blocksize steps instead of one per weight: the loop is bound by its launches (a step
    is a few small kernels), so q/k/v and gate/up together take about the time of one of them. The results equal
    separate calls up to the rounding of the update GEMM over more rows."""
    if len(Ws) == 1:
        return [gptq_quantize(Ws[0], H, **options)]
    sizes = [w.shape[0] for w in Ws]
    W = torch.empty((sum(sizes), Ws[0].shape[1]), dtype=torch.float32, device=Ws[0].device)
    for w, rows in zip(Ws, W.split(sizes)):
        rows.copy_(w.detach())
    res = gptq_quantize(W, H, own_w=True, **options)
    bounds = [0, *itertools.accumulate(sizes)]
    return [res.rows(a, b) for a, b in zip(bounds, bounds[1:])]


def rtn_quantize(W: torch.Tensor, *, bits: int, group_size: int, sym: bool = True) -> torch.Tensor:
    """Round-to-nearest with the same grid as GPTQ (the baseline GPTQ must beat). Returns `[out, in]` float32."""
    W = W.float()
    R, C = W.shape
    gs = group_size if group_size != -1 else C
    out = torch.empty_like(W)
    for g0 in range(0, C, gs):
        x = W[:, g0 : g0 + gs]
        s, z = find_params_reference(x, bits, sym)
        _, q = quantize_reference(x, s[:, None], z[:, None], 2**bits - 1)
        out[:, g0 : g0 + gs] = q
    return out


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared error of the layer's outputs on the calibration inputs (GPTQ's
    objective, with H = 2/n X X^T undamped).

    A progress figure: on CUDA the [out, in] x [in, in] product may run on TF32 tensor cores (precise enough
    for a chart, several times cheaper than float32 for the largest layers)."""
    D = W.float() - Q.to(W.device, torch.float32)
    with tf32_matmuls(D.is_cuda):
        return float(((D @ H.float()) * D).sum())
