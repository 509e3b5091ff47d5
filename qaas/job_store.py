"""The job state machine, on the database: every change of a `jobs` row is one function of this module.

States: queued -> running -> succeeded | failed | cancelled; running -> queued when a worker is
lost and attempts remain; queued -> cancelled. A job that asked for `push_to_hub` stays `running` in
stage `publish` between the GPU worker's hand-over and the I/O worker's verdict. Every transition is
one conditional UPDATE, so two processes racing for the same job (a duplicate broker message, a
sweeper and a worker) cannot both win. Writes from a worker are fenced by the attempt number it
claimed: a worker that lost its lease and was replaced can no longer change the job.

ORM functions take the session explicitly and never commit (the caller's transaction decides). The
API's hot paths on PostgreSQL have direct twins (`async`, one statement on `qaas.db.direct`, named
`*_direct` or `fetch_*`) written right beside the ORM function they must equal; both are built from
the same column lists and values, and `tests/api/test_job_store_pairs.py` pins each pair equal.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from qaas.db import direct
from qaas.db.config import Database
from qaas.db.models import TERMINAL_STATUSES, HubCredential, Job, JobEvent, JobStatus, utcnow
from qaas.quantization_rules import gpus as gpu_rules
from qaas.webhooks import outbox

PROGRESS_MESSAGE_MAX = 500
#: The stage a job waits in (still `running`) from the GPU worker's hand-over to the upload's verdict.
PUBLISH_STAGE = "publish"

#: The columns of `jobs` that reads return (a job document is made of them), in the direct reads' order.
JOB_COLUMNS = ("id", "status", "stage", "progress", "progress_message", "kind", "method", "bits", "source_model",
               "source_revision", "priority", "attempt", "max_attempts", "worker", "cancel_requested", "created_at",
               "started_at", "finished_at", "updated_at", "timings", "error", "result", "request")
#: The columns of `job_events` that reads return.
EVENT_COLUMNS = ("id", "created_at", "kind", "stage", "message", "data")
#: JSON columns: psycopg needs them wrapped on the direct paths (the ORM's types do it there).
_JSON_COLUMNS = frozenset({"request", "timings", "result", "error", "data"})


def _json(column: str, value: Any) -> Any:
    return Jsonb(value) if column in _JSON_COLUMNS and value is not None else value


def row_of(job: Job) -> dict[str, Any]:
    """An ORM job as the row mapping the direct reads return."""
    return {c: getattr(job, c) for c in JOB_COLUMNS}


def event_row_of(event: JobEvent) -> dict[str, Any]:
    return {c: getattr(event, c) for c in EVENT_COLUMNS}


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
    at: dt.datetime | None = None,
) -> JobEvent:
    """Append to the job's timeline (the one table rows are only ever added to)."""
    event = JobEvent(job_id=job_id, kind=kind, stage=stage, message=message, data=data, created_at=at or utcnow())
    session.add(event)
    return event


# --- creation ------------------------------------------------------------------------------------

#: The first event of every job, whichever path created it.
QUEUED_EVENT = {"kind": "status", "stage": None, "message": "queued", "data": {"status": "queued"}}


def new_job_row(
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
    kind: str = "quantize",
) -> dict[str, Any]:
    """Every column of a new job's row: the one definition both `create_job` and `insert_job_direct` store."""
    now = utcnow()
    return dict(
        id=uuid.uuid4(), owner=owner, status=JobStatus.queued.value, cancel_requested=False, priority=priority,
        kind=kind, request=request, request_hash=request_hash, idempotency_key=idempotency_key, method=method, bits=bits,
        source_model=source_model, progress=0.0, timings={}, attempt=0, max_attempts=max_attempts,
        hf_token_encrypted=hf_token_encrypted, webhook_secret_encrypted=webhook_secret_encrypted,
        publish_attempts=0, created_at=now, updated_at=now,
    )


#: The columns `new_job_row` fills, in its order (the direct INSERT names them).
_NEW_JOB_COLUMNS = tuple(new_job_row(owner="", request={}, request_hash="", idempotency_key=None, method="",
                                     bits=None, source_model="", priority=0, max_attempts=1))


def create_job(session: Session, **fields: Any) -> Job:
    """Insert a queued job and its first event (fields: those of `new_job_row`)."""
    row = new_job_row(**fields)
    job = Job(**row)
    session.add(job)
    session.flush()
    add_event(session, job.id, **QUEUED_EVENT, at=row["created_at"])
    return job


# Jobs and their first events in one statement: one round trip, its own transaction (autocommit), and
# the stored rows come back as the answers. A conflicting Idempotency-Key inserts nothing for that row (and
# returns none for it); so does the second of two rows with the same key in one statement.
def _insert_sql(n: int) -> str:
    one = "(" + ", ".join(["%s"] * len(_NEW_JOB_COLUMNS)) + ")"
    return ("WITH j AS (INSERT INTO jobs (" + ", ".join(_NEW_JOB_COLUMNS) + ") VALUES " + ", ".join([one] * n)
            + " ON CONFLICT (owner, idempotency_key) DO NOTHING RETURNING " + ", ".join(JOB_COLUMNS) + "),"
            " e AS (INSERT INTO job_events (job_id, created_at, kind, stage, message, data)"
            " SELECT id, created_at, %s, %s, %s, %s FROM j)"
            " SELECT * FROM j")


#: Most jobs one INSERT stores (each row count is its own prepared statement).
MAX_INSERT_ROWS = 64
_INSERT_SQL = {n: _insert_sql(n) for n in range(1, MAX_INSERT_ROWS + 1)}


async def insert_jobs_direct(db: Database, jobs: Sequence[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """`create_job` for each of `jobs` (the fields of `new_job_row`; at most MAX_INSERT_ROWS) as one statement
    on PostgreSQL, all committed together: per job, in order, the stored row, or None when a job with the same
    Idempotency-Key already exists (nothing is inserted for it then)."""
    rows = [new_job_row(**fields) for fields in jobs]
    params = [_json(c, row[c]) for row in rows for c in _NEW_JOB_COLUMNS]
    params += [QUEUED_EVENT["kind"], QUEUED_EVENT["stage"], QUEUED_EVENT["message"], Jsonb(QUEUED_EVENT["data"])]
    stored = {r[0]: dict(zip(JOB_COLUMNS, r)) for r in await direct.fetch_all_written(db, _INSERT_SQL[len(rows)], params)}
    return [stored.get(row["id"]) for row in rows]


async def insert_job_direct(db: Database, **fields: Any) -> dict[str, Any] | None:
    """`create_job` as one statement on PostgreSQL: the stored row, or None when a job with the same
    Idempotency-Key already exists (nothing is inserted then)."""
    return (await insert_jobs_direct(db, [fields]))[0]


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner == owner, Job.idempotency_key == key)).first()


_BY_IDEMPOTENCY_KEY_SQL = ("SELECT request_hash, " + ", ".join(JOB_COLUMNS)
                           + " FROM jobs WHERE owner = %s AND idempotency_key = %s")


async def fetch_by_idempotency_key(db: Database, owner: str, key: str) -> tuple[str, dict[str, Any]] | None:
    """`find_by_idempotency_key` on a direct connection: (request hash, job row)."""
    found = await direct.fetch_one(db, _BY_IDEMPOTENCY_KEY_SQL, (owner, key))
    return None if found is None else (found[0], dict(zip(JOB_COLUMNS, found[1:])))


# --- reading -------------------------------------------------------------------------------------

_JOB_SELECT = "SELECT " + ", ".join(JOB_COLUMNS) + " FROM jobs"


def get_job(session: Session, job_id: uuid.UUID, owner: str | None = None) -> Job | None:
    stmt = select(Job).where(Job.id == job_id)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return session.scalars(stmt).first()


_GET_JOB_SQL = _JOB_SELECT + " WHERE id = %s AND owner = %s"


async def fetch_job(db: Database, job_id: uuid.UUID, owner: str) -> dict[str, Any] | None:
    """`get_job` of the owner's job on a direct connection, as a row."""
    found = await direct.fetch_one(db, _GET_JOB_SQL, (job_id, owner))
    return None if found is None else dict(zip(JOB_COLUMNS, found))


def status_of(session: Session, job_id: uuid.UUID, owner: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id, Job.owner == owner))


async def fetch_status(db: Database, job_id: uuid.UUID, owner: str) -> str | None:
    found = await direct.fetch_one(db, "SELECT status FROM jobs WHERE id = %s AND owner = %s", (job_id, owner))
    return None if found is None else found[0]


def status_counts(session: Session, owner: str) -> dict[str, int]:
    """How many of the owner's jobs are in each state (states with none are absent)."""
    return dict(session.execute(select(Job.status, func.count()).where(Job.owner == owner).group_by(Job.status)).all())


@dataclass
class Page:
    #: Jobs (ORM) or job rows (direct), newest first.
    items: list[Any]
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


def _page(rows: list[Any], limit: int, key: Callable[[Any], tuple[dt.datetime, uuid.UUID]]) -> Page:
    """A page from `limit + 1` rows: the extra row only says that there is a next page."""
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(*key(rows[-1])) if more and rows else None)


def list_jobs(session: Session, owner: str, *, status: str | None, limit: int, cursor: str | None) -> Page:
    """Newest first; the cursor is the (created_at, id) of the last item of the previous page."""
    stmt = select(Job).where(Job.owner == owner)
    if status:
        stmt = stmt.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return _page(rows, limit, lambda j: (j.created_at, j.id))


def _list_sql(with_status: bool, with_cursor: bool) -> str:
    # (created_at, id) < (a, b) is `list_jobs`'s keyset condition "older, or as old with a smaller id";
    # it walks the (owner, created_at, id) index backwards.
    where = ["owner = %s"]
    if with_status:
        where.append("status = %s")
    if with_cursor:
        where.append("(created_at, id) < (%s, %s)")
    return f"{_JOB_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT %s"


_LIST_SQL = {(s, c): _list_sql(s, c) for s in (False, True) for c in (False, True)}


async def fetch_jobs_page(db: Database, owner: str, *, status: str | None, limit: int, cursor: str | None) -> Page:
    """`list_jobs` on a direct connection (items are rows). Raises ValueError for a foreign cursor."""
    params: list[Any] = [owner]
    if status:
        params.append(status)
    if cursor:
        params.extend(decode_cursor(cursor))
    params.append(limit + 1)
    found = await direct.fetch_all(db, _LIST_SQL[(bool(status), bool(cursor))], params)
    return _page([dict(zip(JOB_COLUMNS, r)) for r in found], limit, lambda r: (r["created_at"], r["id"]))


def list_events(session: Session, job_id: uuid.UUID, *, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    return list(session.scalars(stmt))


def events_after(session: Session, job_id: uuid.UUID, owner: str, after: int,
                 limit: int = 1000) -> tuple[str, list[dict[str, Any]]] | None:
    """(the owner's job's status, its event rows after `after`, oldest first), or None if not the owner's."""
    status = status_of(session, job_id, owner)
    if status is None:
        return None
    return status, [event_row_of(e) for e in list_events(session, job_id, after_id=after, limit=limit)]


# The status and the events in one round trip: one row per event, or a single row with NULL event columns
# when there is none; no row at all when the job is not the owner's.
_EVENTS_SQL = (
    "SELECT j.status, " + ", ".join(f"e.{c}" for c in EVENT_COLUMNS) + " FROM jobs j"
    " LEFT JOIN LATERAL (SELECT " + ", ".join(EVENT_COLUMNS) + " FROM job_events"
    " WHERE job_id = j.id AND id > %s ORDER BY id LIMIT %s) e ON true"
    " WHERE j.id = %s AND j.owner = %s ORDER BY e.id"
)


async def fetch_events_after(db: Database, job_id: uuid.UUID, owner: str, after: int,
                             limit: int = 1000) -> tuple[str, list[dict[str, Any]]] | None:
    """`events_after` in one statement on a direct connection."""
    found = await direct.fetch_all(db, _EVENTS_SQL, (after, limit, job_id, owner))
    if not found:
        return None
    return found[0][0], [dict(zip(EVENT_COLUMNS, r[1:])) for r in found if r[1] is not None]


# --- dispatch bookkeeping -------------------------------------------------------------------------


def mark_dispatched(session: Session, *job_ids: uuid.UUID) -> dt.datetime:
    """The jobs' messages went out to the broker (those still queued are marked; the sweeper skips them).
    Bookkeeping, not a change anyone watches: `updated_at` stays (the 202's document stays current)."""
    now = utcnow()
    session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.status == JobStatus.queued.value)
        .values(dispatched_at=now, updated_at=Job.updated_at).execution_options(synchronize_session=False)
    )
    return now


_MARK_DISPATCHED_SQL = "UPDATE jobs SET dispatched_at = %s WHERE id = ANY(%s) AND status = 'queued'"


async def mark_dispatched_direct(db: Database, job_ids: Sequence[uuid.UUID]) -> dt.datetime:
    """`mark_dispatched` as one statement (the API's dispatcher marks a whole batch at once)."""
    now = utcnow()
    await direct.execute(db, _MARK_DISPATCHED_SQL, (now, list(job_ids)))
    return now


def dispatched_queued_count(session: Session) -> int:
    """Queued jobs whose message was sent: each should have one message waiting in the broker."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.queued.value, Job.dispatched_at.is_not(None))) or 0


def jobs_to_dispatch(session: Session, *, redispatch_after_s: float, limit: int = 500,
                     include_stale: bool = True, stale_limit: int | None = None) -> list[tuple[uuid.UUID, int, int]]:
    """(id, priority, GPUs asked) of queued jobs never sent to the broker, then -- with include_stale, at most
    stale_limit of them -- jobs sent long ago and still not claimed (message lost); each group highest
    priority and oldest first. The GPU count picks the job's queue (`qaas.queue.gpu_queue_name`)."""
    base = select(Job.id, Job.priority, Job.request).where(Job.status == JobStatus.queued.value,
                                                           Job.cancel_requested.is_(False))
    order = (Job.priority.desc(), Job.created_at)

    def rows(query) -> list[tuple[uuid.UUID, int, int]]:
        return [(r[0], r[1], gpu_rules.of_request(r[2])) for r in session.execute(query)]

    out = rows(base.where(Job.dispatched_at.is_(None)).order_by(*order).limit(limit))
    if include_stale and len(out) < limit:
        stale = utcnow() - dt.timedelta(seconds=redispatch_after_s)
        n = min(limit - len(out), stale_limit if stale_limit is not None else limit)
        if n > 0:
            out += rows(base.where(Job.dispatched_at < stale).order_by(*order).limit(n))
    return out


# --- the GPU worker's side ------------------------------------------------------------------------


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


def hub_token_encrypted(session: Session, job: Job) -> bytes | None:
    """The Hub token a job works with: its own, else the owner's saved one (gated or private sources,
    uploads); still encrypted."""
    if job.hf_token_encrypted is not None:
        return job.hf_token_encrypted
    return session.scalar(select(HubCredential.token_encrypted).where(HubCredential.owner == job.owner))


def _fenced(job_id: uuid.UUID, attempt: int):
    return (Job.id == job_id, Job.status == JobStatus.running.value, Job.attempt == attempt)


def heartbeat(session: Session, job_id: uuid.UUID, attempt: int, *, lease_s: float,
              worker: str | None = None) -> tuple[bool, bool]:
    """Extend the lease (only while `worker` holds it, when given: the publish stage changes hands).
    Returns (still ours, cancel requested)."""
    now = utcnow()
    holder = (Job.worker == worker,) if worker is not None else ()
    result = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt), *holder)
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


# --- publishing (the I/O worker's side) -----------------------------------------------------------


def hand_over_to_publish(
    session: Session, job_id: uuid.UUID, attempt: int, *, result: dict[str, Any], timings: dict[str, float],
    source_revision: str | None = None,
) -> bool:
    """GPU side: the model is on disk; park the job in stage `publish`, unheld, for an I/O worker."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(*_fenced(job_id, attempt))
        .values(stage=PUBLISH_STAGE, progress=0.0, progress_message="waiting for an upload worker", result=result,
                timings=timings, worker=None, lease_expires_at=None, dispatched_at=now, updated_at=now,
                **({"source_revision": source_revision} if source_revision else {}))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(session, job_id, "stage", stage=PUBLISH_STAGE, message="publishing to the Hub")
    return res.rowcount == 1


def claim_publish(session: Session, job_id: uuid.UUID, *, worker: str, lease_s: float) -> Job | None:
    """Take a job waiting in stage `publish` (nobody holds it, or its holder's lease lapsed) for one upload."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.stage == PUBLISH_STAGE,
               or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))
        .values(worker=worker, heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_s),
                publish_attempts=Job.publish_attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def release_publish(session: Session, job_id: uuid.UUID, attempt: int, *, worker: str, message: str,
                    retry_in_s: float) -> bool:
    """An upload failed in a way worth retrying: let go of the job (a new message follows in `retry_in_s`)."""
    res = session.execute(
        update(Job).where(*_fenced(job_id, attempt), Job.worker == worker)
        .values(lease_expires_at=None, worker=None, dispatched_at=utcnow(), updated_at=utcnow(),
                progress_message=f"publish failed, retrying in {retry_in_s:.0f}s: {message}"[:PROGRESS_MESSAGE_MAX])
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:
        add_event(session, job_id, "log", stage=PUBLISH_STAGE, message=f"publish attempt failed, will retry: {message}",
                  data={"level": "warning", "retry_in_s": retry_in_s})
    return res.rowcount == 1


def mark_publish_dispatched(session: Session, job_id: uuid.UUID) -> bool:
    """A publish message was sent (again) for a job waiting in stage `publish`."""
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.running.value, Job.stage == PUBLISH_STAGE)
        .values(dispatched_at=utcnow()).execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def stale_publishes(session: Session, *, redispatch_after_s: float, limit: int = 100) -> list[uuid.UUID]:
    """Jobs waiting in stage `publish` with nobody holding them: the publish message was lost or its lease lapsed."""
    now = utcnow()
    stale = now - dt.timedelta(seconds=redispatch_after_s)
    stmt = (
        select(Job.id)
        .where(Job.status == JobStatus.running.value, Job.stage == PUBLISH_STAGE,
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
