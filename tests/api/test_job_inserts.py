"""The API's group commit (api/job_inserts.py) on real PostgreSQL: submissions that arrive together are
stored by one statement and each gets its own row; a row the database refuses fails only its own
submission; the same Idempotency-Key twice in one batch stores one job."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from sqlalchemy import func, select
from support.job_rows import job_fields as _fields

from qaas import job_store
from qaas.api.job_inserts import JobInserter
from qaas.db.models import Job, JobEvent
from qaas.db.session import session_scope


def _counting_statements(monkeypatch) -> list[int]:
    """The row count of every insert statement (the real function still runs)."""
    sizes = []
    real = job_store.insert_jobs_direct

    async def counted(db, jobs):
        sizes.append(len(jobs))
        return await real(db, jobs)

    monkeypatch.setattr(job_store, "insert_jobs_direct", counted)
    return sizes


def test_submissions_that_arrive_together_share_a_statement_and_each_gets_its_own_row(settings, monkeypatch):
    sizes = _counting_statements(monkeypatch)
    db = settings.database

    async def burst():
        inserter = JobInserter(db)
        return await asyncio.gather(*[inserter.insert(_fields(priority=i % 10)) for i in range(20)])

    rows = asyncio.run(burst())
    assert sum(sizes) == 20 and len(sizes) < 20  # the first alone, the rest together
    assert [r["priority"] for r in rows] == [i % 10 for i in range(20)]
    with session_scope(db) as s:
        for r in rows:
            assert job_store.row_of(s.get(Job, r["id"])) == r  # each answer is its own stored row
            assert s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == r["id"])) == 1


def test_a_row_the_database_refuses_fails_only_its_own_submission(settings):
    db = settings.database

    async def mixed():
        inserter = JobInserter(db)
        good = [inserter.insert(_fields()) for _ in range(3)]
        bad = inserter.insert(_fields(source_model="m" * 600))  # longer than the column allows
        return await asyncio.gather(*good[:2], bad, good[2], return_exceptions=True)

    got = asyncio.run(mixed())
    assert isinstance(got[2], psycopg.errors.StringDataRightTruncation)
    assert all(isinstance(r, dict) for i, r in enumerate(got) if i != 2)
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 3


def test_one_idempotency_key_twice_in_a_batch_stores_one_job(settings):
    db = settings.database

    async def twice():
        inserter = JobInserter(db)
        first = inserter.insert(_fields())  # starts a statement; the next three wait for the following one
        return await asyncio.gather(first, *[inserter.insert(_fields(key="same")) for _ in range(3)])

    rows = asyncio.run(twice())
    stored = [r for r in rows[1:] if r is not None]
    assert len(stored) == 1 and rows[0] is not None
    with session_scope(db) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == "same")) == 1


@pytest.mark.parametrize("n", [1, job_store.MAX_INSERT_ROWS])
def test_insert_jobs_direct_answers_in_order(settings, n):
    rows = asyncio.run(job_store.insert_jobs_direct(settings.database, [_fields(priority=i % 10) for i in range(n)]))
    assert [r["priority"] for r in rows] == [i % 10 for i in range(n)]
