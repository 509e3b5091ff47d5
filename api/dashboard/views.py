"""What the dashboard shows, computed from the job rows and events (no HTML here).

Pages, the JSON fallback and the live streams all go through these functions, so a job looks the
same however it reached the browser.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qaas.api.dashboard import eta
from qaas.db.models import TERMINAL_STATUSES, Job, JobEvent, utcnow

log = logging.getLogger("qaas.api.dashboard")

STAGES = ("resolve", "load", "prepare", "calibrate", "quantize", "train", "evaluate", "export", "merge", "publish")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def model_label(name: str, roots: list[Path]) -> str:
    """What tells a job's model apart: a Hub id as it is; a local directory by its path under the allowed root
    that holds it ('models/stories260K'), or as a normalised path outside them (no `..` from old rows)."""
    if not name.startswith("/"):
        return name
    path = Path(os.path.normpath(name))
    under = [path.relative_to(r) for r in roots if path.is_relative_to(r) and path != r]
    return str(min(under, key=lambda p: len(p.parts))) if under else str(path)


def method_label(job: Job) -> str:
    """'GPTQ 4-bit g128', 'AWQ 4-bit g128', 'bitsandbytes NF4 (double quant)', 'bitsandbytes int8',
    'QLoRA r16 on NF4 +DQ'."""
    qc = (job.request or {}).get("quantization_config") or {}
    if getattr(job, "kind", "quantize") == "finetune":
        request = job.request or {}
        r = (request.get("lora") or {}).get("r", 8)
        if "job" in (request.get("model") or {}):
            return f"QLoRA r{r} on a job's 4-bit output"
        if not qc:
            return f"QLoRA r{r} on NF4 +DQ"  # the request's default base
        quant = str(qc.get("bnb_4bit_quant_type") or "fp4").upper()
        return f"QLoRA r{r} on {quant}" + (" +DQ" if qc.get("bnb_4bit_use_double_quant") else "")
    if job.method == "gptq":
        gs = qc.get("group_size")
        return f"GPTQ {job.bits}-bit" + (f" g{gs}" if gs not in (None, -1) else " per-row")
    if job.method == "awq":
        return f"AWQ {job.bits}-bit g{qc.get('group_size') or 128}"
    if job.method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "bitsandbytes int8"
        kind = str(qc.get("bnb_4bit_quant_type") or "fp4").upper()
        return f"bitsandbytes {kind} 4-bit" + (" +DQ" if qc.get("bnb_4bit_use_double_quant") else "")
    if job.method == "gguf":
        return "GGUF " + " ".join(qc.get("types") or [])
    if job.method == "compressed-tensors":  # 'compressed-tensors FP8_DYNAMIC', '... W4A16 g128 GPTQ'
        scheme = str(qc.get("scheme") or "")
        gs = f" g{qc['group_size']}" if qc.get("group_size") else ""
        extra = (" GPTQ" if qc.get("weights") == "gptq" else "") + (" +SQ" if qc.get("smoothing_strength") else "")
        return f"compressed-tensors {scheme}{gs}{extra}"
    return f"{job.method} {job.bits or ''}-bit".strip()


def stage_starts(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, dt.datetime]:
    """When each job entered its current stage (its latest stage event)."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(JobEvent.job_id, func.max(JobEvent.created_at))
        .where(JobEvent.job_id.in_(job_ids), JobEvent.kind == "stage")
        .group_by(JobEvent.job_id)
    )
    out = {}
    for jid, when in rows:
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        out[jid] = when
    return out


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def size(n: int | float | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def iso(when: dt.datetime | None) -> str | None:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if when else None


def shown_time(when: dt.datetime | None) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if when else "–"


def elapsed_s(job: Job, now: dt.datetime) -> float | None:
    if job.started_at is None:
        return None
    return ((job.finished_at or now) - job.started_at).total_seconds()


def ratio_text(result: dict[str, Any]) -> str:
    ratio = result.get("compression_ratio")
    return f"{ratio:.2f}×" if isinstance(ratio, (int, float)) else "–"


def perplexity_change(result: dict[str, Any]) -> str | None:
    """'+2.31 %': how much the perplexity grew from the original model to the quantized one."""
    ev = result.get("evaluation") or {}
    before, after = ev.get("perplexity_before"), ev.get("perplexity_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        return f"{(after / before - 1) * 100:+.2f} %"
    return None


def recent_history(session: Session, owner: str, method: str) -> list[eta.Past]:
    """The owner's latest succeeded jobs of a method, for the ETA (the caller's own jobs only)."""
    stmt = (select(Job.source_model, Job.timings)
            .where(Job.owner == owner, Job.method == method, Job.status == "succeeded")
            .order_by(Job.created_at.desc()).limit(eta.HISTORY_JOBS))
    return [eta.Past(m, dict(t or {})) for m, t in session.execute(stmt)]


@dataclass
class Row:
    """One job as the list shows it."""

    id: str
    status: str
    stage: str | None
    progress: float
    progress_message: str | None
    model: str
    method: str
    worker: str | None
    cancel_requested: bool
    created: str
    created_short: str
    created_iso: str | None
    started_iso: str | None
    finished_iso: str | None
    stage_started_iso: str | None
    elapsed: str
    #: The whole job's time left, and the two parts the page ticks it from (see eta.py).
    eta: str
    eta_typical_s: float | None
    eta_rest_s: float | None
    error_code: str | None
    model_label: str
    size_after: str
    compression: str
    ppl_change: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def row(job: Job, stage_started: dt.datetime | None, now: dt.datetime, roots: list[Path],
        history: list[eta.Past] | None = None) -> Row:
    est = eta.Estimate(None, None)
    left = None
    if job.status == "running" and history is not None:
        spent = eta.in_stage_s(stage_started, now)
        progress = float(job.progress or 0.0)
        est = eta.estimate(job.request or {}, job.source_model, job.stage, progress, spent, job.timings or {}, history)
        left = eta.remaining_s(est, progress, spent)
    result = (job.result or {}) if job.status == "succeeded" else {}
    return Row(
        id=str(job.id), status=job.status, stage=job.stage, progress=float(job.progress or 0.0),
        progress_message=job.progress_message, model=job.source_model, method=method_label(job), worker=job.worker,
        cancel_requested=bool(job.cancel_requested), created=shown_time(job.created_at),
        created_short=job.created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M"), created_iso=iso(job.created_at),
        started_iso=iso(job.started_at), finished_iso=iso(job.finished_at),
        stage_started_iso=iso(stage_started) if job.status == "running" else None,
        elapsed=duration(elapsed_s(job, now)), eta=f"~{duration(left)}" if left is not None else "–",
        eta_typical_s=est.stage_typical_s, eta_rest_s=est.rest_s,
        error_code=(job.error or {}).get("code"), model_label=model_label(job.source_model, roots),
        size_after=size(result.get("size_after_bytes")) if result else "–", compression=ratio_text(result),
        ppl_change=perplexity_change(result) or "–",
    )


def rows(session: Session, jobs: list[Job], roots: list[Path]) -> list[Row]:
    running = [j for j in jobs if j.status == "running"]
    starts = stage_starts(session, [j.id for j in running])
    history = {key: recent_history(session, *key) for key in {(j.owner, j.method) for j in running}}
    now = utcnow()
    return [row(j, starts.get(j.id), now, roots, history.get((j.owner, j.method))) for j in jobs]


def changed_jobs(session: Session, owner: str, since: dt.datetime, limit: int = 200) -> list[Job]:
    """The owner's jobs touched after `since`, oldest change first (for the live list)."""
    stmt = (select(Job).where(Job.owner == owner, Job.updated_at > since)
            .order_by(Job.updated_at).limit(limit))
    return list(session.scalars(stmt))


# --- the job page ---------------------------------------------------------------------------------


@dataclass
class StageSpan:
    name: str
    seconds: float | None
    started_iso: str | None
    current: bool
    label: str
    fraction: float  # of the longest span, for the bar


def timeline(job: Job, events: list[JobEvent], now: dt.datetime | None = None) -> list[StageSpan]:
    """The stages the last attempt went through, with their durations (job.timings when known)."""
    now = now or utcnow()
    timings = dict(job.timings or {})
    # Only the stage events of the last attempt: a retried job restarts at "resolve".
    last_attempt_start = 0
    for i, e in enumerate(events):
        if e.kind == "status" and (e.data or {}).get("status") == "running":
            last_attempt_start = i
    starts: list[tuple[str, dt.datetime]] = []
    for e in events[last_attempt_start:]:
        if e.kind == "stage" and e.stage:
            starts.append((e.stage, e.created_at))
    spans: list[StageSpan] = []
    seen = set()
    for i, (name, started) in enumerate(starts):
        seen.add(name)
        current = i == len(starts) - 1 and job.status == "running"
        if name in timings:
            secs = float(timings[name])
        elif current:
            secs = (now - started).total_seconds()
        elif i + 1 < len(starts):
            secs = (starts[i + 1][1] - started).total_seconds()
        elif job.finished_at is not None:
            secs = (job.finished_at - started).total_seconds()
        else:
            secs = None
        spans.append(StageSpan(name, secs, iso(started), current, "", 0.0))
    for name, secs in timings.items():  # stages known only from timings (events trimmed)
        if name not in seen:
            spans.append(StageSpan(name, float(secs), None, False, "", 0.0))
    longest = max([s.seconds or 0.0 for s in spans] + [1e-9])
    for s in spans:
        s.label = duration(s.seconds)
        s.fraction = max(0.01, (s.seconds or 0.0) / longest)
    return spans


def layer_errors(events: list[JobEvent], result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per-layer relative quantization error, in the order the layers were quantized.

    Progress events carry `data.metrics`: bitsandbytes sends `{"block", "rel_error": {layer: err}}`,
    GPTQ sends `{"layers": {layer: {"rel_error", "gptq_loss", ...}}}`. A finished job also has
    `result.layer_errors.per_layer`, used when the events hold none.
    """
    points: dict[str, float] = {}
    for e in events:
        if e.kind != "progress" or not e.data:
            continue
        points.update(metric_points(e.data.get("metrics")))
    if not points and result:
        per_layer = ((result.get("layer_errors") or {}).get("per_layer")) or {}
        points = {k: float(v) for k, v in per_layer.items() if isinstance(v, (int, float))}
    return [{"layer": k, "rel_error": v} for k, v in points.items()]


def metric_points(metrics: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    if not isinstance(metrics, dict):
        return out
    rel = metrics.get("rel_error")
    if isinstance(rel, dict):
        out.update({str(k): float(v) for k, v in rel.items() if isinstance(v, (int, float))})
    elif isinstance(rel, (int, float)) and metrics.get("layer"):
        out[str(metrics["layer"])] = float(rel)
    layers = metrics.get("layers")
    if isinstance(layers, dict):
        for name, m in layers.items():
            if isinstance(m, dict) and isinstance(m.get("rel_error"), (int, float)):
                out[str(name)] = float(m["rel_error"])
    return out


def _stage_order(item: tuple[str, Any]) -> tuple[int, str]:
    return (STAGES.index(item[0]) if item[0] in STAGES else len(STAGES), item[0])


def result_view(job: Job) -> dict[str, Any] | None:
    r = job.result
    if not r or job.status != "succeeded":
        return None
    ev = r.get("evaluation") or {}
    files = [{"name": f.get("name"), "size": size(f.get("size")), "bytes": f.get("size"), "sha256": f.get("sha256"),
              "url": f"/dashboard/jobs/{job.id}/files/{f.get('name')}"} for f in r.get("files") or []]
    hub = r.get("hub") or None
    hub_view = None
    if isinstance(hub, dict):
        repo = hub.get("repo_id")
        hub_view = {"repo_id": repo, "url": hub.get("url") or hub.get("repo_url") or hub.get("commit_url"),
                    "commit": hub.get("commit_sha") or hub.get("commit") or hub.get("oid"),
                    "commit_url": hub.get("commit_url"), "revision": hub.get("revision"),
                    "pr_url": hub.get("pr_url")}
    before, after = ev.get("perplexity_before"), ev.get("perplexity_after")
    le = r.get("layer_errors") or {}
    return {
        "files": files,
        "archive_url": f"/dashboard/jobs/{job.id}/files.tar",
        "size_before": size(r.get("size_before_bytes")),
        "size_after": size(r.get("size_after_bytes")),
        "ratio": ratio_text(r),
        "ppl_before": f"{before:.3f}" if isinstance(before, (int, float)) else "–",
        "ppl_after": f"{after:.3f}" if isinstance(after, (int, float)) else "–",
        "ppl_change": perplexity_change(r),
        "eval_windows": ev.get("windows"),
        "eval_skipped": ev.get("skipped"),
        "mean_error": f"{le['mean']:.4f}" if isinstance(le.get("mean"), (int, float)) else "–",
        "max_error": f"{le['max']:.4f}" if isinstance(le.get("max"), (int, float)) else "–",
        "skipped": r.get("skipped_modules") or [],
        "timings": [(k, duration(float(v))) for k, v in sorted((r.get("timings") or {}).items(), key=_stage_order)
                    if isinstance(v, (int, float))],
        "hub": hub_view,
        "device": r.get("device"),
        "notes": r.get("notes") or [],
        "gguf": gguf_rows(r),
    }


def gguf_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """A GGUF job's files by type: size, bits per weight, perplexity through llama.cpp and its change."""
    ev = result.get("evaluation") or {}
    before, per_type = ev.get("perplexity_before"), ev.get("per_type") or {}
    rows = []
    for o in (result.get("gguf") or {}).get("outputs") or []:
        ppl = (per_type.get(o.get("type")) or {}).get("perplexity")
        ok = isinstance(ppl, (int, float))
        rows.append({"type": str(o.get("type")), "size": size(o.get("size")),
                     "bpw": f"{o['bits_per_weight']:.2f}" if isinstance(o.get("bits_per_weight"), (int, float)) else "–",
                     "ppl": f"{ppl:.3f}" if ok else "–",
                     "change": f"{(ppl / before - 1) * 100:+.2f} %" if ok and isinstance(before, (int, float)) and before
                     else ""})
    return rows


# --- webhook deliveries ---------------------------------------------------------------------------


def list_deliveries(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    """The job's webhook deliveries as GET /v1/jobs/{id}/deliveries gives them (the caller checks ownership)."""
    from qaas.api.webhooks.schemas import DeliveryOut
    from qaas.webhooks.service import job_deliveries

    return [DeliveryOut.of(d).model_dump() for d in job_deliveries(session, job_id)]
