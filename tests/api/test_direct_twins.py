"""Each direct-SQL twin of `qaas.job_store` and `qaas.keys` against the ORM function beside it.

The API's hot paths on PostgreSQL run single statements (`fetch_*`, `*_direct`); the worker, the
dashboard and embedded mode use the ORM functions. A twin that drifted from its ORM function would
show two truths about one row, so each pair is run on the same rows here and the results compared.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
from conftest import new_key
from sqlalchemy import select, update
from support.job_rows import job_fields as _fields

from qaas import job_store, keys
from qaas.db.models import ApiKey, Job, JobEvent, utcnow
from qaas.db.session import session_scope
from qaas.security import hash_api_key


def _orm_job(db, **fields) -> uuid.UUID:
    with session_scope(db) as s:
        return job_store.create_job(s, **_fields(**fields)).id


def _run(coro):
    return asyncio.run(coro)


def _columns(s, job_id) -> dict:
    job = s.get(Job, job_id)
    return {c.key: getattr(job, c.key) for c in Job.__table__.columns}


def _event_values(s, job_id) -> list[tuple]:
    return [(e.kind, e.stage, e.message, e.data) for e in
            s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))]


def test_insert_job_direct_stores_the_row_and_first_event_create_job_stores(settings):
    db = settings.database
    orm_id = _orm_job(db)
    row = _run(job_store.insert_job_direct(db, **_fields()))
    with session_scope(db) as s:
        orm, twin = _columns(s, orm_id), _columns(s, row["id"])
        assert row == job_store.row_of(s.get(Job, row["id"]))  # what it returns is what it stored
        skip = {"id", "created_at", "updated_at"}
        assert {k: v for k, v in twin.items() if k not in skip} == {k: v for k, v in orm.items() if k not in skip}
        assert twin["created_at"] == twin["updated_at"]
        assert _event_values(s, row["id"]) == _event_values(s, orm_id) == [("status", None, "queued", {"status": "queued"})]
        first = s.scalars(select(JobEvent).where(JobEvent.job_id == row["id"])).one()
        assert first.created_at == twin["created_at"]


def test_idempotency_key_lookups_agree_and_a_conflicting_insert_stores_nothing(settings):
    db = settings.database
    orm_id = _orm_job(db, key="k1")
    assert _run(job_store.insert_job_direct(db, **_fields(key="k1"))) is None
    with session_scope(db) as s:
        assert s.scalar(select(Job.id).where(Job.idempotency_key == "k1")) == orm_id
        found = job_store.find_by_idempotency_key(s, "alice", "k1")
        assert _run(job_store.fetch_by_idempotency_key(db, "alice", "k1")) == (found.request_hash, job_store.row_of(found))
        assert job_store.find_by_idempotency_key(s, "bob", "k1") is None
    assert _run(job_store.fetch_by_idempotency_key(db, "bob", "k1")) is None


def test_fetch_job_and_fetch_status_equal_get_job_and_status_of(settings):
    db = settings.database
    ids = [_orm_job(db) for _ in range(3)]
    with session_scope(db) as s:
        job = job_store.claim(s, ids[1], worker="w", lease_s=5)
        job_store.record_progress(s, ids[1], job.attempt, stage="quantize", fraction=0.5, message="half", data=None)
        job = job_store.claim(s, ids[2], worker="w", lease_s=5)
        job_store.finish(s, ids[2], job.attempt, job_store.JobStatus.failed, error={"code": "x", "message": "y"})
    with session_scope(db) as s:
        for job_id in ids + [uuid.uuid4()]:
            for owner in ("alice", "mallory"):
                orm = job_store.get_job(s, job_id, owner)
                assert _run(job_store.fetch_job(db, job_id, owner)) == (orm and job_store.row_of(orm))
                assert _run(job_store.fetch_status(db, job_id, owner)) == job_store.status_of(s, job_id, owner)


def test_fetch_jobs_page_walks_the_same_pages_as_list_jobs(settings):
    db = settings.database
    tie = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [_orm_job(db) for _ in range(7)]
    _orm_job(db, owner="bob")
    with session_scope(db) as s:
        for i, job_id in enumerate(ids):  # ties on created_at are broken by id, the same way on both
            s.execute(update(Job).where(Job.id == job_id).values(created_at=tie + dt.timedelta(seconds=i // 3)))
        s.execute(update(Job).where(Job.id.in_(ids[:3])).values(status="failed"))
    for status in (None, "failed", "running"):
        cursor, walked = None, 0
        while True:
            with session_scope(db) as s:
                orm = job_store.list_jobs(s, "alice", status=status, limit=2, cursor=cursor)
                expected = [job_store.row_of(j) for j in orm.items]
            twin = _run(job_store.fetch_jobs_page(db, "alice", status=status, limit=2, cursor=cursor))
            assert (twin.items, twin.next_cursor) == (expected, orm.next_cursor)
            walked += len(expected)
            cursor = orm.next_cursor
            if cursor is None:
                break
        assert walked == {None: 7, "failed": 3, "running": 0}[status]
    with pytest.raises(ValueError):
        _run(job_store.fetch_jobs_page(db, "alice", status=None, limit=2, cursor="not-a-cursor"))


def test_fetch_events_after_equals_events_after(settings):
    db = settings.database
    job_id = _orm_job(db)
    with session_scope(db) as s:
        for i in range(4):
            job_store.add_event(s, job_id, "progress", stage="quantize", message=f"block {i}", data={"i": i})
    with session_scope(db) as s:
        last = s.scalar(select(JobEvent.id).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc()).limit(1))
        for after, limit in ((0, 1000), (0, 2), (last - 1, 1000), (last, 1000)):
            for owner in ("alice", "mallory"):
                orm = job_store.events_after(s, job_id, owner, after, limit)
                assert _run(job_store.fetch_events_after(db, job_id, owner, after, limit)) == orm
        assert job_store.events_after(s, job_id, "alice", last, 1000) == ("queued", [])
        assert job_store.events_after(s, uuid.uuid4(), "alice", 0, 1000) is None


def test_mark_dispatched_direct_changes_what_mark_dispatched_changes(settings):
    db = settings.database
    orm_ids, twin_ids = [_orm_job(db) for _ in range(2)], [_orm_job(db) for _ in range(2)]
    with session_scope(db) as s:  # one of each pair already running: neither path may touch it
        for job_id in (orm_ids[1], twin_ids[1]):
            job_store.claim(s, job_id, worker="w", lease_s=5)
    with session_scope(db) as s:
        before = {i: _columns(s, i) for i in orm_ids + twin_ids}
    with session_scope(db) as s:
        job_store.mark_dispatched(s, *orm_ids)
    _run(job_store.mark_dispatched_direct(db, twin_ids))
    with session_scope(db) as s:
        changed = {i: {k for k, v in _columns(s, i).items() if v != before[i][k]} for i in before}
    assert changed == {orm_ids[0]: {"dispatched_at"}, twin_ids[0]: {"dispatched_at"}, orm_ids[1]: set(), twin_ids[1]: set()}


def test_fetch_caller_equals_caller_of(settings):
    db = settings.database
    secret = settings.secret_key.get_secret_value()
    valid, revoked = new_key(settings, "alice"), new_key(settings, "alice", name="old")
    with session_scope(db) as s:
        s.execute(update(ApiKey).where(ApiKey.key_hash == hash_api_key(revoked, secret)).values(revoked_at=utcnow()))
    with session_scope(db) as s:
        for key in (valid, revoked, "qaas_" + "x" * 43):
            digest = hash_api_key(key, secret)
            assert _run(keys.fetch_caller(db, digest)) == keys.caller_of(s, digest)
        assert keys.caller_of(s, hash_api_key(valid, secret)).owner == "alice"
        assert keys.caller_of(s, hash_api_key(revoked, secret)) is None
