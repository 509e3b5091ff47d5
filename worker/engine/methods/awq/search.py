"""AWQ's arithmetic (Lin et al., 2023; AutoAWQ's `AwqQuantizer`): the group quantizer, the per-channel scale
search of one scaling group, folding the scales into the float model, and the clipping search.

* `group_quantize`: round-to-nearest, asymmetric, per group of `group_size` input channels: scale
  (max - min) / 15, integer zero -round(min / scale), codes clamp(round(w / scale) + zero, 0, 15).
* `search_scales`: for alpha in 0, 1/20, ..., 19/20, s = mean|x|^alpha per input channel (with duo scaling
  AutoAWQ's mean|x|^alpha / mean|w~|^(1-alpha), w~ the weight normalized by its group's max), normalized so
  that sqrt(max(s) min(s)) = 1; each layer of the group becomes Q(W diag(s)) diag(s)^-1 and the submodule
  the group feeds (`inspect`: the attention, the MLP, or the layer itself) runs on the captured calibration
  inputs; the s with the least mean squared error against the float output wins. Weights are restored after
  every trial.
* `apply_scales`: the float model unchanged, W diag(s) in the layers and diag(s)^-1 in the operation before
  them (a norm's weight, or the output rows of a Linear), so the quantizer sees the scaled weights.
* `search_clip`: per output row and group, the clipping range max|w| (1 - i/20), i < 10, whose quantized
  layer output on (a sample of) the calibration inputs is closest to the unclipped float output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MAX_INT = 15


@dataclass
class GroupQuant:
    """One layer quantized by groups: `codes` `[out, in]` int32, `scales` float32 (float16 values) and
    integer `zeros` float32, both `[out, in / group_size]`, and the dequantized weight `w_hat` `[out, in]`."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    w_hat: torch.Tensor


def _params(wg: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    max_val = wg.amax(dim=-1, keepdim=True)
    min_val = wg.amin(dim=-1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / MAX_INT
    if round_scale:  # the float16 scale the checkpoint stores, so that it reproduces w_hat exactly
        scales = scales.clamp(max=65504.0).half().float()
    zeros = (-torch.round(min_val / scales)).clamp(0, MAX_INT)
    return scales, zeros


def fake_quantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q(w): the dequantized group quantization of `w` `[out, in]`, in w's dtype (the search's inner step)."""
    rows, cols = w.shape
    wg = w.float().reshape(rows, cols // group_size, group_size)
    scales, zeros = _params(wg, round_scale=False)
    q = (torch.clamp(torch.round(wg / scales) + zeros, 0, MAX_INT) - zeros) * scales
    return q.reshape(rows, cols).to(w.dtype)


def group_quantize(w: torch.Tensor, group_size: int) -> GroupQuant:
    """The final quantization of `w` `[out, in]` with float16-representable scales."""
    rows, cols = w.shape
    wg = w.float().reshape(rows, cols // group_size, group_size)
    scales, zeros = _params(wg, round_scale=True)
    codes = torch.clamp(torch.round(wg / scales) + zeros, 0, MAX_INT)
    w_hat = ((codes - zeros) * scales).reshape(rows, cols)
    return GroupQuant(codes.reshape(rows, cols).to(torch.int32), scales.squeeze(-1), zeros.squeeze(-1), w_hat)


def channel_mean_abs(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean |x| per input channel over every calibration token (float32)."""
    total, count = None, 0
    for x in xs:
        flat = x.reshape(-1, x.shape[-1])
        s = flat.abs().float().sum(0)
        total = s if total is None else total + s
        count += flat.shape[0]
    return total / max(count, 1)


def weight_mean_scaled(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's w_mean: |w| / max |w| of its group, averaged per input channel over the group's layers."""
    w = torch.cat([x.float() for x in weights], dim=0)
    rows, cols = w.shape
    wg = w.abs().reshape(-1, group_size)
    ws = (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(rows, cols)
    return ws.mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if w_mean is not None:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s) | torch.isnan(s)] = 1
    return s


@dataclass
class ScaleSearch:
    """The outcome of one group's search: the chosen alpha and scales, and the loss of every alpha tried."""

    alpha: float
    scales: torch.Tensor
    losses: list[float]

    @property
    def loss(self) -> float:
        return min(self.losses)


@torch.no_grad()
def search_scales(
    layers: Sequence[torch.nn.Linear],
    quantized: Sequence[bool],
    x_mean: torch.Tensor,
    run_inspect: Callable[[], list[torch.Tensor]],
    reference: Sequence[torch.Tensor],
    *,
    group_size: int,
    n_grid: int,
    duo_scaling: bool,
    check_cancelled: Callable[[], None] = lambda: None,
) -> ScaleSearch:
    """The grid search of one scaling group. `layers` all read the same input (mean |x| = `x_mean`);
    those with `quantized[i]` false stay float (scaled, not rounded); `run_inspect()` runs the submodule the
    group feeds on every calibration batch; `reference` is its float output."""
    originals = [m.weight.data.clone() for m in layers]
    dev = originals[0].device
    x_mean = x_mean.to(dev)
    w_mean = weight_mean_scaled([w for w, q in zip(originals, quantized) if q], group_size) if duo_scaling else None
    losses: list[float] = []
    best, best_loss, best_alpha = None, float("inf"), 0.0
    try:
        for i in range(n_grid):
            check_cancelled()
            alpha = i / n_grid
            s = candidate_scales(x_mean, w_mean, alpha)
            for m, w, q in zip(layers, originals, quantized):
                if q:
                    m.weight.data = (fake_quantize(w * s.view(1, -1).to(w.dtype), group_size) / s.view(1, -1)
                                     ).to(w.dtype)
            loss = mse(reference, run_inspect())
            losses.append(loss)
            if loss < best_loss:
                best, best_loss, best_alpha = s.clone(), loss, alpha
            for m, w in zip(layers, originals):
                m.weight.data = w.clone()
    finally:
        for m, w in zip(layers, originals):
            m.weight.data = w
    if best is None:  # every trial was NaN: no scaling
        best = torch.ones_like(x_mean)
    return ScaleSearch(best_alpha, best.detach(), losses)


def mse(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> float:
    total, n = 0.0, 0
    for r, o in zip(reference, outputs):
        total += float((r.float() - o.float()).pow(2).sum())
        n += r.numel()
    return total / max(n, 1)


@torch.no_grad()
def apply_scales(prev: torch.nn.Module, prev_kind: str, layers: Sequence[torch.nn.Linear], s: torch.Tensor) -> None:
    """Fold s into the model: prev's output divided by s, each layer's input columns multiplied by s."""
    s = s.to(prev.weight.device)
    if prev_kind == "norm":
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # a Linear: its last len(s) output rows (all of them when the shapes match)
        prev.weight[-s.numel():].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for m in layers:
        m.weight.mul_(s.view(1, -1).to(m.weight.dtype))


@torch.no_grad()
def search_clip(w: torch.Tensor, xs: Sequence[torch.Tensor], *, group_size: int, n_grid: int = 20,
                max_shrink: float = 0.5, n_sample_tokens: int = 512) -> torch.Tensor:
    """Per-group clipping bound `[out, in / group_size]` for `w` `[out, in]` (AutoAWQ's `_compute_best_clip`):
    the bound among max|w| (1 - i / n_grid), i < max_shrink n_grid, whose quantized output on up to
    `n_sample_tokens` calibration tokens (evenly strided) is closest to the float output."""
    rows, cols = w.shape
    x = torch.cat([t.reshape(-1, cols) for t in xs], dim=0)
    step = max(1, x.shape[0] // n_sample_tokens)
    x = x[::step].to(w.device, torch.float32)
    x = x.reshape(1, x.shape[0], cols // group_size, group_size)  # [1, tokens, groups, gs]
    wf = w.float().reshape(rows, 1, cols // group_size, group_size)
    # rows in batches bound the [rows, tokens, groups, gs] products' memory: 2 GiB of float32 on a GPU
    # (AutoAWQ's 64-256 rows for a 14336-wide layer), 256 MiB on the CPU
    budget = (512 if w.is_cuda else 64) * 2**20
    batch = max(1, min(rows, budget // max(1, x.numel())))
    best_all = []
    for r0 in range(0, rows, batch):
        wb = wf[r0 : r0 + batch]
        org_max = wb.abs().amax(dim=-1, keepdim=True)  # [b, 1, groups, 1]
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        org_out = (x * wb).sum(dim=-1)  # [b, tokens, groups]
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            q = fake_quantize(cur.reshape(-1, group_size), group_size).reshape(cur.shape)
            err = ((x * q).sum(dim=-1) - org_out).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best)
    return torch.cat(best_all, dim=0).reshape(rows, cols // group_size)


@torch.no_grad()
def apply_clip(layer: torch.nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = layer.weight.data
    rows, cols = w.shape
    mv = max_val.to(w.device, w.dtype).unsqueeze(-1)
    wg = w.reshape(rows, cols // group_size, group_size)
    layer.weight.data = torch.clamp(wg, -mv, mv).reshape(rows, cols)
