"""A fine-tuning job's loss curve for its page: the training loss of every logged step and the held-out loss at
each evaluation point, drawn as an inline SVG on the server (no script, no external library), so the page
shows it as soon as it loads and the live panel redraws it with every swap.

Points come from the job's progress events (`metrics.loss` / `metrics.eval_loss` with `metrics.step`); a
finished job's `result.loss` (the whole curve, thinned) is used when it holds more.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

WIDTH, HEIGHT = 640, 220
PAD_L, PAD_R, PAD_T, PAD_B = 48, 12, 12, 28


def points(events: list[Any], result: dict[str, Any] | None) -> dict[str, list[tuple[float, float]]]:
    """{"train": [(step, loss)...], "eval": [(step, eval loss)...]}, each sorted by step."""
    train: dict[float, float] = {}
    evals: dict[float, float] = {}
    for e in events:
        if getattr(e, "kind", None) != "progress" or not e.data:
            continue
        m = e.data.get("metrics")
        if not isinstance(m, dict) or not isinstance(m.get("step"), (int, float)):
            continue
        if isinstance(m.get("loss"), (int, float)):
            train[float(m["step"])] = float(m["loss"])
        if isinstance(m.get("eval_loss"), (int, float)):
            evals[float(m["step"])] = float(m["eval_loss"])
    loss = (result or {}).get("loss") or {}
    curve = loss.get("curve") or []
    if len(curve) > len(train):
        train = {float(p[0]): float(p[1]) for p in curve if len(p) >= 2}
    for p in loss.get("evals") or []:
        evals[float(p[0])] = float(p[1])
    return {"train": sorted(train.items()), "eval": sorted(evals.items())}


def _fmt(v: float) -> str:
    return f"{v:.1f}"


def svg(curve: dict[str, list[tuple[float, float]]]) -> Markup | None:
    """The chart, or None when there is nothing to draw. Only numbers go into the markup."""
    train, evals = curve["train"], curve["eval"]
    every = train + evals
    if not every:
        return None
    x_max = max(s for s, _ in every) or 1.0
    lo, hi = min(v for _, v in every), max(v for _, v in every)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    w, h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def xy(step: float, value: float) -> tuple[str, str]:
        return _fmt(PAD_L + w * step / x_max), _fmt(PAD_T + h * (hi - value) / (hi - lo))

    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" '
             'aria-labelledby="loss-title"><title id="loss-title">Training loss and held-out loss by step</title>',
             f'<line class="axis" x1="{PAD_L}" y1="{PAD_T + h}" x2="{PAD_L + w}" y2="{PAD_T + h}"/>',
             f'<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + h}"/>']
    for value in (hi, (hi + lo) / 2, lo):
        _, y = xy(0, value)
        parts.append(f'<text x="{PAD_L - 6}" y="{y}" text-anchor="end" dominant-baseline="middle">{value:.3g}</text>')
    parts.append(f'<text x="{PAD_L}" y="{HEIGHT - 8}">0</text>')
    parts.append(f'<text x="{PAD_L + w}" y="{HEIGHT - 8}" text-anchor="end">step {int(x_max)}</text>')
    if train:
        path = " ".join(("M" if i == 0 else "L") + ",".join(xy(s, v)) for i, (s, v) in enumerate(train))
        parts.append(f'<path class="loss-train" d="{path}" fill="none"/>')
    for s, v in evals:
        cx, cy = xy(s, v)
        parts.append(f'<circle class="loss-eval" cx="{cx}" cy="{cy}" r="4"><title>step {int(s)}: held-out loss '
                     f'{v:.4f}</title></circle>')
    parts.append("</svg>")
    return Markup("".join(parts))


def summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the result panel says about a finished fine-tuning job."""
    if not result or result.get("kind") != "finetune":
        return None
    loss, lora, training = result.get("loss") or {}, result.get("lora") or {}, result.get("training") or {}
    fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    return {"loss_first": fmt(loss.get("first")), "loss_last": fmt(loss.get("last")),
            "trainable": lora.get("trainable_parameters"), "total": lora.get("total_parameters"),
            "steps": training.get("total_steps"), "optim": training.get("optim"),
            "resumed_from": result.get("resumed_from_step"),
            "held_out": (result.get("data") or {}).get("held_out")}
