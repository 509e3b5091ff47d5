"""Service metrics in Prometheus' text format, computed from the database at scrape time.

State lives in the database, so any API process answers for the whole service (several API processes,
several workers): no per-process counters to add up, nothing lost when a process restarts. Histograms
are cumulative over the jobs (and delivery attempts) still in the database, so they only grow while
rows are kept, as Prometheus expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from qaas.db.models import DeliveryAttempt, Job, JobStatus, WebhookDelivery, utcnow

STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
MEMORY_BUCKETS = tuple(2.0 ** p for p in range(26, 38))  # 64 MiB .. 128 GiB
STATES = [s.value for s in JobStatus]


def _histogram(name: str, doc: str, label: str, values: dict[str, list[float]], buckets: tuple[float, ...]) -> Metric:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for key, vals in sorted(values.items()):
        counts = []
        for b in buckets:
            counts.append((_fmt(b), sum(1 for v in vals if v <= b)))
        counts.append(("+Inf", len(vals)))
        h.add_metric([key], counts, sum_value=float(sum(vals)))
    return h


def _fmt(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else str(b)


class DatabaseCollector(Collector):
    def __init__(self, session_factory) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterable[Metric]:
        with self.session_factory() as s:
            yield from self._jobs(s)
            yield from self._stages(s)
            yield from self._memory(s)
            yield from self._queue(s)
            yield from self._workers(s)
            yield from self._webhooks(s)

    def _jobs(self, s: Session) -> Iterable[Metric]:
        g = GaugeMetricFamily("qaas_jobs", "Jobs by state", labels=["state"])
        counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for state in STATES:
            g.add_metric([state], counts.get(state, 0))
        yield g
        attempts = GaugeMetricFamily("qaas_jobs_retried", "Jobs that needed more than one attempt, by state",
                                     labels=["state"])
        retried = dict(s.execute(select(Job.status, func.count()).where(Job.attempt > 1).group_by(Job.status)).all())
        for state in STATES:
            attempts.add_metric([state], retried.get(state, 0))
        yield attempts
        errors = GaugeMetricFamily("qaas_jobs_failed_by_code", "Failed jobs by error code", labels=["code"])
        rows = s.execute(select(Job.error).where(Job.status == JobStatus.failed.value, Job.error.is_not(None))).scalars()
        by_code: dict[str, int] = {}
        for err in rows:
            code = str((err or {}).get("code") or "unknown")[:64]
            by_code[code] = by_code.get(code, 0) + 1
        for code, n in sorted(by_code.items()):
            errors.add_metric([code], n)
        yield errors

    def _stages(self, s: Session) -> Iterable[Metric]:
        per_stage: dict[str, list[float]] = {}
        if s.bind.dialect.name == "postgresql":
            rows = s.execute(text(
                "SELECT t.key, t.value::float8 FROM jobs, jsonb_each_text(jobs.timings) AS t "
                "WHERE jobs.status IN ('succeeded','failed','cancelled') AND jsonb_typeof(jobs.timings) = 'object'"
                " AND t.value ~ '^[0-9.eE+-]+$'"))
            for stage, seconds in rows:
                per_stage.setdefault(stage[:32], []).append(float(seconds))
        else:
            for timings in s.execute(select(Job.timings).where(Job.finished_at.is_not(None))).scalars():
                for stage, seconds in (timings or {}).items():
                    if isinstance(seconds, (int, float)) and math.isfinite(seconds):
                        per_stage.setdefault(stage[:32], []).append(float(seconds))
        yield _histogram("qaas_job_stage_duration_seconds", "Time spent in each stage by finished jobs (last attempt)",
                         "stage", per_stage, STAGE_BUCKETS)

    def _memory(self, s: Session) -> Iterable[Metric]:
        peaks: dict[str, list[float]] = {"host_rss": [], "gpu": []}
        for result in s.execute(select(Job.result).where(Job.status == JobStatus.succeeded.value,
                                                         Job.result.is_not(None))).scalars():
            res = (result or {}).get("resources") or {}
            if res.get("peak_rss_bytes"):
                peaks["host_rss"].append(float(res["peak_rss_bytes"]))
            if res.get("gpu_peak_bytes"):
                peaks["gpu"].append(float(res["gpu_peak_bytes"]))
        yield _histogram("qaas_job_peak_memory_bytes",
                         "Peak memory of a job's engine process: host RSS, and GPU when the engine reports it",
                         "kind", peaks, MEMORY_BUCKETS)

    def _queue(self, s: Session) -> Iterable[Metric]:
        now = utcnow()
        depth = GaugeMetricFamily("qaas_queue_depth", "Queued jobs (waiting for a GPU worker), by priority",
                                  labels=["priority"])
        for prio, n in s.execute(select(Job.priority, func.count()).where(Job.status == JobStatus.queued.value)
                                 .group_by(Job.priority).order_by(Job.priority)).all():
            depth.add_metric([str(prio)], n)
        yield depth
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.queued.value))
        yield GaugeMetricFamily("qaas_queue_oldest_age_seconds", "Age of the oldest queued job (0 when none)",
                                value=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
        undispatched = s.scalar(select(func.count()).select_from(Job).where(
            Job.status == JobStatus.queued.value, Job.dispatched_at.is_(None))) or 0
        yield GaugeMetricFamily("qaas_queue_undispatched", "Queued jobs whose broker message was never sent "
                                "(broker down at submission; the sweeper sends them)", value=undispatched)

    def _workers(self, s: Session) -> Iterable[Metric]:
        now = utcnow()
        beat = GaugeMetricFamily("qaas_worker_heartbeat_age_seconds",
                                 "Seconds since each busy worker last renewed its job's lease", labels=["worker"])
        expired = 0
        rows = s.execute(select(Job.worker, func.max(Job.heartbeat_at), func.min(Job.lease_expires_at))
                         .where(Job.status == JobStatus.running.value, Job.worker.is_not(None))
                         .group_by(Job.worker)).all()
        for worker, last, lease in rows:
            beat.add_metric([worker], max(0.0, (now - last).total_seconds()) if last else float("nan"))
            if lease is not None and lease < now:
                expired += 1
        yield beat
        yield GaugeMetricFamily("qaas_workers_busy", "Workers holding a running job", value=len(rows))
        yield GaugeMetricFamily("qaas_workers_lease_expired", "Busy workers whose lease has lapsed (lost; the "
                                "sweeper requeues their jobs)", value=expired)

    def _webhooks(self, s: Session) -> Iterable[Metric]:
        g = GaugeMetricFamily("qaas_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
        counts = dict(s.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)).all())
        for status in ("pending", "delivered", "failed", "disabled"):
            g.add_metric([status], counts.get(status, 0))
        yield g
        c = CounterMetricFamily("qaas_webhook_delivery_attempts", "Webhook delivery attempts by outcome",
                                labels=["outcome"])
        for outcome, n in sorted(s.execute(select(DeliveryAttempt.outcome, func.count())
                                           .group_by(DeliveryAttempt.outcome)).all()):
            c.add_metric([outcome], n)
        yield c


def registry_for(session_factory) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory))
    return registry
