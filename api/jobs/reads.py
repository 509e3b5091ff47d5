"""The jobs API's hot reads -- a job, a page of jobs, a job's events -- as JSON-ready documents.

On PostgreSQL each is one statement on a direct connection (`job_store.fetch_*`): status polls are most
of the API's traffic, and an ORM session around a one-row SELECT cost more than the query. Elsewhere
(embedded SQLite) the same rows come from the ORM twins of those functions, in the thread pool. Both
become documents through `schemas.job_document` / `event_document`, so the shape cannot differ.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

from qaas import job_store
from qaas.api.jobs import document_cache
from qaas.api.jobs.schemas import event_document, job_document
from qaas.db.config import Database, as_database
from qaas.db.session import in_thread
from qaas.settings import Settings


def _row_or_none(job) -> dict[str, Any] | None:
    return None if job is None else job_store.row_of(job)


async def job_of(db: Database | str, job_id: uuid.UUID, owner: str) -> dict[str, Any] | None:
    """The caller's job as a JobOut document, or None (no such job, or another tenant's)."""
    db = as_database(db)
    if db.direct:
        row = await job_store.fetch_job(db, job_id, owner)
    else:
        row = await in_thread(db, lambda s: _row_or_none(job_store.get_job(s, job_id, owner)))
    return None if row is None else job_document(row)


async def job_json(settings: Settings, job_id: uuid.UUID, owner: str) -> bytes | None:
    """`job_of` serialized (pydantic-core's encoder, the model's own), from this process's document cache
    when it holds the job (see document_cache for what a cached answer can be: the staleness bound)."""
    cache = document_cache.cache_for(settings)
    ticket = None
    if cache is not None:
        hit = cache.get(job_id, owner)
        if hit is not None:
            return hit
        ticket = cache.ticket()  # before the read: a change announced during it keeps the answer out
    doc = await job_of(settings.database, job_id, owner)
    if doc is None:
        return None
    body = to_json(doc)
    if cache is not None:
        cache.put(ticket, job_id, owner, body)
    return body


@dataclass
class JobsPage:
    items: list[dict[str, Any]]
    next_cursor: str | None


async def jobs_page(db: Database | str, owner: str, *, status: str | None, limit: int, cursor: str | None) -> JobsPage:
    """A page of the caller's jobs, newest first. Raises ValueError for a cursor this API did not make."""
    db = as_database(db)
    if db.direct:
        page = await job_store.fetch_jobs_page(db, owner, status=status, limit=limit, cursor=cursor)
        rows = page.items
    else:
        page = await in_thread(db, lambda s: job_store.list_jobs(s, owner, status=status, limit=limit, cursor=cursor))
        rows = [job_store.row_of(j) for j in page.items]  # loaded before the session closed
    return JobsPage([job_document(r) for r in rows], page.next_cursor)


async def events_after(db: Database | str, job_id: uuid.UUID, owner: str, after: int,
                       limit: int = 1000) -> tuple[str, list[dict[str, Any]]] | None:
    """(job status, EventOut documents after `after`, oldest first), or None if the job is not the caller's."""
    db = as_database(db)
    if db.direct:
        got = await job_store.fetch_events_after(db, job_id, owner, after, limit)
    else:
        got = await in_thread(db, lambda s: job_store.events_after(s, job_id, owner, after, limit))
    return None if got is None else (got[0], [event_document(e) for e in got[1]])


async def job_status(db: Database | str, job_id: uuid.UUID, owner: str) -> str | None:
    """The caller's job's status, or None if it is not the caller's."""
    db = as_database(db)
    if db.direct:
        return await job_store.fetch_status(db, job_id, owner)
    return await in_thread(db, lambda s: job_store.status_of(s, job_id, owner))
