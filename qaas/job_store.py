"""The job state machine, on the database. Service functions take the session explicitly.

States: queued -> running -> succeeded | failed | cancelled; running -> queued when a worker is
lost and attempts remain; queued -> cancelled. Every transition is one conditional UPDATE, so two
processes racing for the same job (a duplicate broker message, a sweeper and a worker) cannot both
win. Writes from a worker are fenced by the attempt number it claimed: a worker that lost its lease
and was replaced can no longer change the job.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from qaas import outbox
from qaas.db.models import TERMINAL_STATUSES, Job, JobEvent, JobStatus, utcnow

PROGRESS_MESSAGE_MAX = 500


def request_fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of a request body, for Idempotency-Key comparisons."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def add_event(
    session: Session,
    job_id: uuid.UUID,
    kind: str,
    *,
    stage: str | None = None,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, stage=stage, message=message, data=data, created_at=utcnow())
    session.add(event)
    return event


# --- creation and reading -------------------------------------------------------------------------


def create_job(
    session: Session,
    *,
    owner: str,
    request: dict[str, Any],
    request_hash: str,
    idempotency_key: str | None,
    method: str,
    bits: int | None,
    source_model: str,
    priority: int,
    max_attempts: int,
    hf_token_encrypted: bytes | None = None,
    webhook_secret_encrypted: bytes | None = None,
) -> Job:
    job = Job(
        id=uuid.uuid4(),
        owner=owner,
        status=JobStatus.queued.value,
        request=request,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        method=method,
        bits=bits,
        source_model=source_model,
        priority=priority,
        max_attempts=max_attempts,
        timings={},
        progress=0.0,
        attempt=0,
        cancel_requested=False,
        hf_token_encrypted=hf_token_encrypted,
        webhook_secret_encrypted=webhook_secret_encrypted,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "status", message="queued", data={"status": "queued"})
    return job


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    stmt = select(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt).first()


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()


@dataclass
class Page:
    items: list[Job]
    next_cursor: str | None


def encode_cursor(created_at: dt.datetime, job_id: uuid.UUID) -> str:
    """The cursor after the job (created_at, id): where the next page of a newest-first listing starts."""
    raw = f"{created_at.isoformat()}|{job_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    """Raises ValueError for a cursor this service did not make."""
    padded = cursor + "=" * (-len(cursor) % 4)
    created, _, job_id = base64.urlsafe_b64decode(padded.encode()).decode().partition("|")
    when = dt.datetime.fromisoformat(created)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when, uuid.UUID(job_id)


def list_jobs(session: Session, owner: str, *, status: str | None, limit: int, cursor: str | None) -> Page:
    """Newest first; the cursor is the (created_at, id) of the last item of the previous page."""
    stmt = select(Job).where(Job.owner == owner)
    if status:
        stmt = stmt.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


def list_events(session: Session, job_id: uuid.UUID, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(stmt))


# --- dispatch bookkeeping -------------------------------------------------------------------------


def mark_dispatched(session: Session, job_id: uuid.UUID) -> dt.datetime:
    now = utcnow()
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.queued.value).values(dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    return now


def dispatched_queued_count(session: Session) -> int:
    """Queued jobs whose message was sent: each should have one message waiting in the broker."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.queued.value, Job.dispatched_at.is_not(None))) or 0


def jobs_to_dispatch(session: Session, *, redispatch_after_s: float, limit: int = 500,
                     include_stale: bool = True, stale_limit: int | None = None) -> list[tuple[uuid.UUID, int]]:
    """(id, priority) of queued jobs never sent to the broker, then -- with include_stale, at most
    stale_limit of them -- jobs sent long ago and still not claimed (message lost); each group highest
    priority and oldest first."""
    base = select(Job.id, Job.priority).where(Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
    order = (Job.priority.desc(), Job.created_at)
    out = [(r[0], r[1]) for r in session.execute(base.where(Job.dispatched_at.is_(None)).order_by(*order).limit(limit))]
    if include_stale and len(out) < limit:
        stale = utcnow() - dt.timedelta(seconds=redispatch_after_s)
        n = min(limit - len(out), stale_limit if stale_limit is not None else limit)
        if n > 0:
            out += [(r[0], r[1]) for r in session.execute(base.where(Job.dispatched_at < stale).order_by(*order).limit(n))]
    return out


# --- the worker's side ----------------------------------------------------------------------------


def claim(session: Session, job_id: uuid.UUID, *, worker: str, lease_s: float) -> Job | None:
    """Take a queued job for this worker, atomically. None if someone else has it (or it is gone)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.running.value,
            attempt=Job.attempt + 1,
            worker=worker,
            heartbeat_at=now,
            lease_expires_at=now + dt.timedelta(seconds=lease_s),
            started_at=func.coalesce(Job.started_at, now),
            stage=None,
            progress=0.0,
            progress_message=None,
            timings={},
            error=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_event(session, job_id, "status", message=f"running on {worker} (attempt {job.attempt})",
              data={"status": "running", "attempt": job.attempt, "worker": worker})
    outbox.record(session, job, "job.started")
    return job


def _fenced(job_id: uuid.UUID, attempt: int):
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempt == attempt)


def heartbeat(session: Session, job_id: uuid.UUID, attempt: int, *, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease. Returns (still ours, cancel requested)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
        .values(heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return result.rowcount == 1, bool(cancel)


def record_stage(
    session: Session, job_id: uuid.UUID, attempt: int, stage: str, *, message: str = "", timings: dict[str, float]
) -> bool:
    result = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
        .values(stage=stage, progress=0.0, progress_message=(message or stage)[:PROGRESS_MESSAGE_MAX],
                timings=timings, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        add_event(session, job_id, "stage", stage=stage, message=message or stage)
    return result.rowcount == 1


def record_progress(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    stage: str | None,
    fraction: float,
    message: str,
    data: dict[str, Any] | None,
    store_event: bool = True,
) -> bool:
    result = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
        .values(progress=max(0.0, min(1.0, fraction)), progress_message=message[:PROGRESS_MESSAGE_MAX], updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1 and store_event:
        add_event(session, job_id, "progress", stage=stage, message=message, data=data)
    return result.rowcount == 1


def finish(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    status: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    source_revision: str | None = None,
) -> bool:
    """Move a running job to a terminal state; the Hub token is wiped with it."""
    assert status.terminal
    values: dict[str, Any] = dict(
        status=status.value, finished_at=utcnow(), updated_at=utcnow(), result=result, error=error,
        lease_expires_at=None, hf_token_encrypted=None,
    )
    if status is JobStatus.succeeded:
        values["progress"] = 1.0
    if timings is not None:
        values["timings"] = timings
    if source_revision:
        values["source_revision"] = source_revision
    res = session.execute(update(Job).where(*_fenced(job_id, attempt)).values(**values).execution_options(synchronize_session=False))
    if res.rowcount == 1:
        add_event(session, job_id, "status", message=status.value if not error else f"{status.value}: {error.get('message')}",
                  data={"status": status.value, **({"error": error} if error else {})})
        # The announcement commits with the verdict: never lost, never sent for a state that did not commit.
        job = session.get(Job, job_id, populate_existing=True)
        outbox.record(session, job, outbox.TERMINAL_EVENTS[status.value])
    return res.rowcount == 1


def requeue_for_retry(session: Session, job_id: uuid.UUID, attempt: int, reason: str) -> bool:
    """A running attempt ended without a verdict (worker lost, transient error): queue it again."""
    res = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt), Job.attempt < Job.max_attempts)
        .values(status=JobStatus.queued.value, worker=None, lease_expires_at=None, dispatched_at=None,
                stage=None, progress=0.0, progress_message=f"retrying: {reason}"[:PROGRESS_MESSAGE_MAX], updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(session, job_id, "status", message=f"queued again after attempt {attempt}: {reason}",
                  data={"status": "queued", "attempt": attempt, "reason": reason})
    return res.rowcount == 1


def expired_leases(session: Session, limit: int = 100) -> list[tuple[uuid.UUID, int, str | None]]:
    """Running jobs whose worker stopped renewing its lease: (id, attempt, stage)."""
    stmt = (
        select(Job.id, Job.attempt, Job.stage)
        .where(Job.status == JobStatus.running.value, Job.lease_expires_at < utcnow())
        .limit(limit)
    )
    return [(row[0], row[1], row[2]) for row in session.execute(stmt)]


def stale_publishes(session: Session, *, redispatch_after_s: float, limit: int = 100) -> list[uuid.UUID]:
    """Jobs waiting in stage `publish` with nobody holding them: the publish message was lost or its lease lapsed."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=redispatch_after_s)
    stmt = (
        select(Job.id)
        .where(Job.status == JobStatus.running.value, Job.stage == "publish",
               or_(and_(Job.lease_expires_at.is_(None), or_(Job.dispatched_at.is_(None), Job.dispatched_at < stale)),
                   Job.lease_expires_at < now))
        .limit(limit)
    )
    return list(session.scalars(stmt))


# --- the user's side ------------------------------------------------------------------------------


def request_cancel(session: Session, job: Job) -> Job:
    """Cancel a queued job at once; ask a running one to stop (its worker finishes the job)."""
    if job.status in TERMINAL_STATUSES:
        return job
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, cancel_requested=True, finished_at=now, updated_at=now,
                hf_token_encrypted=None)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(session, job.id, "status", message="cancelled before it started", data={"status": "cancelled"})
        outbox.record(session, session.get(Job, job.id, populate_existing=True), "job.cancelled")
    else:
        session.execute(
            update(Job).where(Job.id == job.id, Job.status == JobStatus.running.value)
            .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False)
        )
        add_event(session, job.id, "log", message="cancellation requested")
    session.flush()
    refreshed = session.get(Job, job.id, populate_existing=True)
    assert refreshed is not None
    return refreshed
