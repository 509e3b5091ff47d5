"""The webhook outbox: which deliveries a job event creates, written in the event's own transaction.

A job's final state and the rows announcing it commit together, so the announcement can be neither
lost (a crash after the commit still leaves the rows) nor sent for a state that never committed.
Workers on the I/O queue send the rows; the sweeper re-sends the ones that are due.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qaas.db.models import Job, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.db.session import session_scope
from qaas.queue import send_delivery
from qaas.settings import Settings

log = logging.getLogger("qaas.webhooks")

TERMINAL_EVENTS = {"succeeded": "job.succeeded", "failed": "job.failed", "cancelled": "job.cancelled"}
#: Event types an account endpoint may subscribe to; the last two are opt-in.
EVENT_TYPES = ("job.succeeded", "job.failed", "job.cancelled", "job.started", "job.progress")
DEFAULT_EVENT_TYPES = tuple(TERMINAL_EVENTS.values())


def job_payload(job: Job) -> dict[str, Any]:
    """What a receiver learns about the job: enough to act, no secrets, no internal paths."""
    result = job.result or {}
    data: dict[str, Any] = {
        "id": str(job.id),
        "status": job.status,
        "model": job.source_model,
        "source_revision": job.source_revision,
        "kind": job.kind,
        "method": job.method,
        "bits": job.bits,
        "stage": job.stage,
        "attempt": job.attempt,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "url": f"/v1/jobs/{job.id}",
    }
    if job.error:
        data["error"] = job.error
    if job.status == "succeeded":
        data["result"] = {
            "files": result.get("files"),
            "size_before_bytes": result.get("size_before_bytes"),
            "size_after_bytes": result.get("size_after_bytes"),
            "evaluation": result.get("evaluation"),
            "hub": result.get("hub"),
        }
        if job.kind == "finetune":  # what a receiver acts on: how training went
            loss = result.get("loss") or {}
            data["result"]["loss"] = {k: loss.get(k) for k in ("first", "last", "min", "evals")}
            data["result"]["resumed_from_step"] = result.get("resumed_from_step")
    return data


def record(session: Session, job: Job, event_type: str, *, extra: dict[str, Any] | None = None) -> list[WebhookDelivery]:
    """Create the deliveries for one event of one job (in the caller's transaction)."""
    payload = job_payload(job)
    if extra:
        payload.update(extra)
    now = utcnow()
    rows: list[WebhookDelivery] = []
    own = (job.request or {}).get("webhook")
    # The request's own webhook hears about the end of the job (and nothing else).
    if own and own.get("url") and event_type in TERMINAL_EVENTS.values():
        rows.append(WebhookDelivery(job_id=job.id, endpoint_id=None, owner=job.owner, url=own["url"]))
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.owner == job.owner, WebhookEndpoint.disabled_at.is_(None))
    ).all()
    for ep in endpoints:
        if event_type in (ep.event_types or []):
            rows.append(WebhookDelivery(job_id=job.id, endpoint_id=ep.id, owner=job.owner, url=ep.url))
    for row in rows:
        row.id = uuid.uuid4()
        row.msg_id = "msg_" + uuid.uuid4().hex
        row.event_type = event_type
        row.payload = json.loads(json.dumps(payload, default=str))
        row.status = "pending"
        row.attempts = 0
        row.next_attempt_at = now
        row.created_at = now
        session.add(row)
    return rows


REDISPATCH_S = 60.0


def claim_due_deliveries(session: Session, limit: int = 200) -> list[uuid.UUID]:
    """Due deliveries with no message on its way (or one sent long ago and lost); marks them sent."""
    now = utcnow()
    stmt = (
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .where((WebhookDelivery.locked_until.is_(None)) | (WebhookDelivery.locked_until < now))
        .where((WebhookDelivery.dispatched_at.is_(None))
               | (WebhookDelivery.dispatched_at < now - dt.timedelta(seconds=REDISPATCH_S)))
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    ids = list(session.scalars(stmt))
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(dispatched_at=now)
                        .execution_options(synchronize_session=False))
    return ids


def claim_due_deliveries_of_job(session: Session, job_id: uuid.UUID) -> list[uuid.UUID]:
    """Like claim_due_deliveries, for one job's new deliveries (sent right after its verdict commits)."""
    now = utcnow()
    ids = list(session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.job_id == job_id, WebhookDelivery.status == "pending", WebhookDelivery.dispatched_at.is_(None))))
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(dispatched_at=now)
                        .execution_options(synchronize_session=False))
    return ids


def send_job_deliveries(settings: Settings, job_id: uuid.UUID) -> None:
    """Hand a job's new deliveries to the I/O queue right after the event committed (best effort:
    the sweeper sends whatever is due anyway)."""
    try:
        with session_scope(settings.database) as s:
            ids = claim_due_deliveries_of_job(s, job_id)
        for delivery_id in ids:
            send_delivery(settings, delivery_id)
    except Exception as exc:  # noqa: BLE001 - the database or broker blinked; the sweeper catches up
        log.warning("could not send the deliveries of %s now: %s", job_id,
                                                   exc.__class__.__name__)


def reset_for_redelivery(delivery: WebhookDelivery) -> None:
    """The user asked for a delivery again: pending, due now, same webhook-id, a fresh retry schedule
    (earlier attempts stay in the attempt log). The caller commits and sends the message."""
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.locked_until = None
    delivery.dispatched_at = utcnow()


LOCK_S = 60.0


def lock_for_attempt(session: Session, delivery_id: uuid.UUID) -> WebhookDelivery | None:
    """Take a due delivery for one attempt; None if another sender has it or it is not due."""
    now = utcnow()
    res = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
               WebhookDelivery.next_attempt_at <= now,
               (WebhookDelivery.locked_until.is_(None)) | (WebhookDelivery.locked_until < now))
        .values(locked_until=now + dt.timedelta(seconds=LOCK_S))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)
