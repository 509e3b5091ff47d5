"""The GPTQ paper's Algorithm 1, written plainly in torch, as the published `fasterquant` does it.

This is the yardstick for the fast path (`qaas.worker.engine.gptq_algorithm`) and the baseline of
`bench/gptq_speed.py`: lazy batch updates of `blocksize` columns, the upper Cholesky factor of the
inverse Hessian, one small update per column (several kernel launches per column on a GPU).

With `act_group_aware`, GPTQModel's group-aware reordering (GAR, `gptqmodel/quantization/gar.py` and its use in
`gptqmodel/quantization/gptq.py`, version 7.7) written out plainly: whole groups of `group_size` consecutive input
channels ordered by the largest Hessian diagonal they hold, the channels inside each group by decreasing diagonal;
groups stay whole, so every channel keeps its group (`g_idx = i // group_size`) and the scales stay in group order.
Two deliberate differences from GPTQModel 7.7: a partial last group is kept last with its channels sorted like any
group's (GPTQModel keeps them in their original order), and with `static_groups` each channel uses its own group's
precomputed scale (GPTQModel indexes the precomputed groups by the permuted position there).

Quirks of the published code kept on purpose, since the fast path must match it:
  * with groups, a group's scale/zero are computed from `W` when its first column is reached, where `W`
    still holds the values at the start of the current lazy block (the intra-block updates live in `W1`);
  * with `group_size == -1` the scale/zero come from the weight before dead columns are zeroed.
"""

from __future__ import annotations

import torch

from qaas.kernels.gptq_reference import find_params_reference, quantize_reference, stored_scale


def gar_permutation_reference(diag_h: torch.Tensor, group_size: int) -> torch.Tensor:
    """GAR's column order: `perm[new_position] = old_column` (see the module docstring)."""
    d = diag_h.tolist()
    C = len(d)
    groups = [list(range(g, min(g + group_size, C))) for g in range(0, C, group_size)]
    full = [g for g in groups if len(g) == group_size]
    tail = [g for g in groups if len(g) < group_size]
    # sorted() is stable, also with reverse=True: ties keep their original order, as torch's stable argsort does.
    ordered = sorted(full, key=lambda g: max(d[c] for c in g), reverse=True) + tail
    return torch.tensor([c for g in ordered for c in sorted(g, key=lambda c: d[c], reverse=True)], dtype=torch.long)


def fasterquant_reference(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = -1,
    sym: bool = True,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    act_group_aware: bool = False,
    static_groups: bool = False,
    blocksize: int = 128,
    round_scale: bool = False,
) -> dict:
    """Quantize `W` (`[out, in]`) against the Hessian `H` (`[in, in]`); returns dict(Q=..., codes=..., ...).

    `Q` is the dequantized weight in the original column order (float32), with the scales the loop used: float32 as
    in the published code, or rounded to float16 first with `round_scale`; `Q_stored` the same codes with the
    scales rounded to the float16 a checkpoint stores (what a consumer computes, and what qaas writes back).
    """
    maxq = 2**bits - 1
    W = W.clone().float()
    H = H.clone().float()
    rows, columns = W.shape

    def params(x):
        return find_params_reference(x, bits, sym, round_scale=round_scale)

    scale, zero = params(W)  # per row over all columns (used when group_size == -1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = None
    if static_groups and group_size != -1:
        groups = [params(W[:, i : i + group_size]) for i in range(0, columns, group_size)]

    perm = None
    if desc_act or (act_group_aware and group_size != -1):
        if desc_act:  # act-order replaces GAR
            perm = torch.argsort(torch.diag(H), descending=True)
        else:
            perm = gar_permutation_reference(torch.diag(H), group_size)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=W.device)
    col_scale = torch.zeros_like(W)
    col_zero = torch.zeros_like(W)

    damp = damp_percent * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros(rows, count, dtype=torch.int32, device=W.device)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size != -1:
                if not static_groups:
                    if (i1 + i) % group_size == 0:
                        scale, zero = params(W[:, (i1 + i) : (i1 + i + group_size)])
                else:
                    idx = i1 + i
                    if perm is not None:
                        idx = int(perm[idx])
                    scale, zero = groups[idx // group_size]
            c, q = quantize_reference(w, scale, zero, maxq)
            col_scale[:, i1 + i] = scale
            col_zero[:, i1 + i] = zero
            Q1[:, i] = q
            C1[:, i] = c.to(torch.int32)
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    Q_stored = stored_scale(col_scale) * (codes - col_zero)
    if perm is not None:
        Q = Q[:, invperm]
        Q_stored = Q_stored[:, invperm]
        codes = codes[:, invperm]
    return {"Q": Q, "Q_stored": Q_stored, "codes": codes, "perm": perm}


def layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Squared output error of replacing W by Q on the calibration inputs: tr((W-Q) H (W-Q)^T)."""
    D = (W.double() - Q.double())
    return float(torch.einsum("ri,ij,rj->", D, H.double(), D))
