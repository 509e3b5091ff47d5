"""The jobs API's hot reads -- a job, a page of jobs, a job's events -- as JSON-ready documents.

On PostgreSQL each is one prepared statement on a direct connection (`qaas.db.direct`): status polls
are most of the API's traffic, and the ORM session around a one-row SELECT cost more than the query.
Elsewhere (embedded SQLite) the same documents come from the ORM service functions of `job_store`.
Both go through `schemas.job_document` / `event_document`, so the shape cannot differ.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from qaas import job_store
from qaas.api.jobs.schemas import EVENT_COLUMNS, JOB_COLUMNS, event_document, job_document, orm_job_document
from qaas.db import direct
from qaas.db.async_session import read

_JOB_SELECT = "SELECT " + ", ".join(JOB_COLUMNS) + " FROM jobs"
_GET_JOB = _JOB_SELECT + " WHERE id = %s AND owner = %s"
_STATUS_AT = JOB_COLUMNS.index("status")
_CREATED_AT = JOB_COLUMNS.index("created_at")


def _row_document(row: tuple) -> dict[str, Any]:
    return job_document(dict(zip(JOB_COLUMNS, row)))


async def job_of(db_url: str, job_id: uuid.UUID, owner: str) -> dict[str, Any] | None:
    """The caller's job as a JobOut document, or None (no such job, or another tenant's)."""
    if direct.supports(db_url):
        row = await direct.fetch_one(db_url, _GET_JOB, (job_id, owner))
        return None if row is None else _row_document(row)
    job = await read(db_url, lambda s: job_store.get_job(s, job_id, owner))
    return None if job is None else orm_job_document(job)


@dataclass
class JobsPage:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _list_sql(with_status: bool, with_cursor: bool) -> str:
    # (created_at, id) < (a, b) is the keyset condition "older, or as old with a smaller id";
    # it walks the (owner, created_at, id) index backwards.
    where = ["owner = %s"]
    if with_status:
        where.append("status = %s")
    if with_cursor:
        where.append("(created_at, id) < (%s, %s)")
    return f"{_JOB_SELECT} WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT %s"


_LIST_SQL = {(s, c): _list_sql(s, c) for s in (False, True) for c in (False, True)}


async def jobs_page(db_url: str, owner: str, *, status: str | None, limit: int, cursor: str | None) -> JobsPage:
    """A page of the caller's jobs, newest first. Raises ValueError for a cursor this API did not make."""
    if not direct.supports(db_url):
        page = await read(db_url, lambda s: job_store.list_jobs(s, owner, status=status, limit=limit, cursor=cursor))
        return JobsPage([orm_job_document(j) for j in page.items], page.next_cursor)
    params: list[Any] = [owner]
    if status:
        params.append(status)
    if cursor:
        params.extend(job_store.decode_cursor(cursor))
    params.append(limit + 1)
    rows = await direct.fetch_all(db_url, _LIST_SQL[(bool(status), bool(cursor))], params)
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    next_cursor = job_store.encode_cursor(last[_CREATED_AT], last[0]) if more and last else None
    return JobsPage([_row_document(r) for r in rows], next_cursor)


# The job's status and the events after an id, in one round trip: one row per event, or a single row
# with NULL event columns when there is none; no row at all when the job is not the caller's.
_EVENTS_SQL = (
    "SELECT j.status, " + ", ".join(f"e.{c}" for c in EVENT_COLUMNS) + " FROM jobs j"
    " LEFT JOIN LATERAL (SELECT " + ", ".join(EVENT_COLUMNS) + " FROM job_events"
    " WHERE job_id = j.id AND id > %s ORDER BY id LIMIT %s) e ON true"
    " WHERE j.id = %s AND j.owner = %s ORDER BY e.id"
)


async def events_after(db_url: str, job_id: uuid.UUID, owner: str, after: int,
                       limit: int = 1000) -> tuple[str, list[dict[str, Any]]] | None:
    """(job status, EventOut documents after `after`, oldest first), or None if the job is not the caller's."""
    if not direct.supports(db_url):
        def page(s):
            job = job_store.get_job(s, job_id, owner)
            if job is None:
                return None
            events = job_store.list_events(s, job_id, after_id=after, limit=limit)
            return job.status, [event_document({c: getattr(e, c) for c in EVENT_COLUMNS}) for e in events]

        return await read(db_url, page)
    rows = await direct.fetch_all(db_url, _EVENTS_SQL, (after, limit, job_id, owner))
    if not rows:
        return None
    events = [event_document(dict(zip(EVENT_COLUMNS, r[1:]))) for r in rows if r[1] is not None]
    return rows[0][0], events


async def job_status(db_url: str, job_id: uuid.UUID, owner: str) -> str | None:
    """The caller's job's status, or None if it is not the caller's."""
    if direct.supports(db_url):
        row = await direct.fetch_one(db_url, "SELECT status FROM jobs WHERE id = %s AND owner = %s", (job_id, owner))
        return None if row is None else row[0]
    job = await read(db_url, lambda s: job_store.get_job(s, job_id, owner))
    return None if job is None else job.status
