"""The API's direct PostgreSQL paths (status, listing, events, submission) against the ORM truth.

The hot paths skip the ORM (`api/jobs/reads.py`, `service.submit_direct`, `qaas/db/direct.py`); these
tests pin them to what the ORM paths produce for the same rows -- byte for byte -- and check the
connection pool's behaviour when the server drops a connection or cannot be reached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import psycopg
import pytest
from conftest import STORIES, auth, make_settings
from sqlalchemy import select

from qaas import job_store
from qaas.api.jobs import reads, service
from qaas.api.jobs.schemas import EventOut, JobOut
from qaas.db import direct
from qaas.db.models import Job, JobEvent, JobStatus
from qaas.db.session import session_scope
from qaas.schemas.job_request import JobRequest
from pydantic_core import to_json

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _store_job(db: str, owner: str, **values) -> uuid.UUID:
    with session_scope(db) as s:
        job = job_store.create_job(s, owner=owner, request={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                                   request_hash="h", idempotency_key=None, method="bitsandbytes", bits=4,
                                   source_model=str(STORIES), priority=3, max_attempts=3)
        for k, v in values.items():
            setattr(job, k, v)
        return job.id


def _jobs_in_every_shape(db: str) -> list[uuid.UUID]:
    now = dt.datetime.now(dt.UTC)
    return [
        _store_job(db, "alice"),
        _store_job(db, "alice", status="running", stage="quantize", progress=0.25, progress_message="block 3/12",
                   attempt=1, worker="w1", started_at=now, timings={"load": 1.5}),
        _store_job(db, "alice", status="succeeded", finished_at=now, source_revision="abc123",
                   result={"files": [{"name": "model.safetensors", "size": 123}, {"name": "config.json", "size": 4}],
                           "metrics": {"perplexity": 12.5}}),
        # an error with extra keys and no `field`: the document keeps exactly the schema's four
        _store_job(db, "alice", status="failed", finished_at=now,
                   error={"code": "oom", "message": "out of memory", "stage": "quantize", "detail": "x"}),
        _store_job(db, "alice", status="cancelled", cancel_requested=True, finished_at=now),
    ]


def test_job_document_is_byte_identical_to_the_orm_model(settings):
    db = settings.resolved_database_url
    ids = _jobs_in_every_shape(db)

    async def documents():
        return [await reads.job_of(db, i, "alice") for i in ids]

    got = asyncio.run(documents())
    with session_scope(db) as s:
        for job_id, doc in zip(ids, got):
            assert to_json(doc) == JobOut.from_job(s.get(Job, job_id)).model_dump_json().encode()


def test_status_read_over_http_is_the_orm_document_and_tenants_are_isolated(client, settings, api_key, other_key):
    db = settings.resolved_database_url
    ids = _jobs_in_every_shape(db)
    with session_scope(db) as s:
        expected = {str(i): JobOut.from_job(s.get(Job, i)).model_dump(mode="json") for i in ids}
    for job_id in ids:
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(api_key))
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.json() == expected[str(job_id)]
        # another tenant's id is indistinguishable from a missing one
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(other_key))
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=auth(api_key)).status_code == 404


def test_listing_walks_every_job_once_newest_first_with_ties_broken_by_id(client, settings, api_key):
    db = settings.resolved_database_url
    same_instant = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [_store_job(db, "alice", created_at=same_instant + dt.timedelta(seconds=i // 3)) for i in range(8)]
    ids.append(_store_job(db, "alice", status="failed", error={"code": "x", "message": "y"}))
    _store_job(db, "bob")  # never listed for alice
    with session_scope(db) as s:
        orm_order = [str(j.id) for j in job_store.list_jobs(s, "alice", status=None, limit=100, cursor=None).items]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=auth(api_key)).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == orm_order and len(seen) == len(set(seen)) == 9
    failed = client.get("/v1/jobs", params={"status": "failed"}, headers=auth(api_key)).json()
    assert [j["id"] for j in failed["items"]] == [str(ids[-1])] and failed["next_cursor"] is None
    bad = client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=auth(api_key))
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


def test_event_page_matches_the_orm_and_hides_other_tenants(client, settings, api_key, other_key):
    db = settings.resolved_database_url
    job_id = _store_job(db, "alice")
    with session_scope(db) as s:
        for i in range(3):
            job_store.add_event(s, job_id, "progress", stage="quantize", message=f"block {i}", data={"i": i})
    with session_scope(db) as s:
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        expected = [EventOut.from_event(e).model_dump(mode="json") for e in events]
    page = client.get(f"/v1/jobs/{job_id}/events", headers=auth(api_key)).json()
    assert page == {"items": expected, "job_status": "queued"}
    after = client.get(f"/v1/jobs/{job_id}/events", params={"after": expected[1]["id"]}, headers=auth(api_key)).json()
    assert after["items"] == expected[2:]
    none_left = client.get(f"/v1/jobs/{job_id}/events", params={"after": expected[-1]["id"]}, headers=auth(api_key))
    assert none_left.json() == {"items": [], "job_status": "queued"}
    assert client.get(f"/v1/jobs/{job_id}/events", headers=auth(other_key)).status_code == 404


def _request(**over) -> JobRequest:
    return JobRequest.model_validate({"model": {"path": str(STORIES)}, "quantization_config": NF4, **over})


def test_direct_submission_stores_the_same_row_as_the_orm_path(settings):
    db = settings.resolved_database_url

    async def submit():
        return await service.submit_direct(settings, "alice", _request(webhook={"url": "https://example.com/hook"}), None)

    sub = asyncio.run(submit())
    assert not sub.replayed and sub.webhook_secret and sub.webhook_secret.startswith("whsec_")
    with session_scope(db) as s:
        job = s.get(Job, sub.job_id)
        assert to_json(sub.document) == JobOut.from_job(job).model_dump_json().encode()
        assert job.status == JobStatus.queued.value and job.dispatched_at is not None
        assert job.webhook_secret_encrypted and job.publish_attempts == 0
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)))
        assert [(e.kind, e.message, e.data) for e in events] == [("status", "queued", {"status": "queued"})]
        # the sync path's row for the same request, field for field (ids and instants aside)
        other = service.submit(s, settings, "alice", _request(webhook={"url": "https://example.com/hook"}), None)
        twin = s.get(Job, other.job_id)
        skip = {"id", "created_at", "updated_at", "dispatched_at", "webhook_secret_encrypted"}
        cols = [c.key for c in Job.__table__.columns if c.key not in skip]
        assert {c: getattr(job, c) for c in cols} == {c: getattr(twin, c) for c in cols}


def test_direct_submissions_racing_on_one_idempotency_key_make_one_job(settings):
    db = settings.resolved_database_url

    async def race():
        return await asyncio.gather(*[service.submit_direct(settings, "alice", _request(), "same-key")
                                      for _ in range(6)])

    subs = asyncio.run(race())
    assert len({s.job_id for s in subs}) == 1
    assert sum(not s.replayed for s in subs) == 1
    with session_scope(db) as s:
        assert len(list(s.scalars(select(Job.id).where(Job.owner == "alice")))) == 1

    async def reuse():
        return await service.submit_direct(settings, "alice", _request(options={"priority": 7}), "same-key")

    from qaas.api.problems import Problem

    with pytest.raises(Problem) as info:
        asyncio.run(reuse())
    assert info.value.status == 422 and info.value.errors[0]["field"] == "Idempotency-Key"


def test_a_read_on_a_connection_the_server_dropped_is_retried_on_a_fresh_one(settings):
    db = settings.resolved_database_url
    job_id = _store_job(db, "alice")

    async def scenario():
        first = await reads.job_of(db, job_id, "alice")
        pool = direct.pool_for(db)
        assert len(pool.idle) == 1
        pid = pool.idle[0][0].info.backend_pid
        with psycopg.connect(direct.conninfo_of(db), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        second = await reads.job_of(db, job_id, "alice")  # would fail on the dead connection
        assert pool.idle[0][0].info.backend_pid != pid
        await direct.close_pools()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == second and first["id"] == job_id


def test_unreachable_database_is_a_503_problem(tmp_path, redis_db, api_key):
    from fastapi.testclient import TestClient

    from qaas import auth_cache
    from qaas.api.app import create_app
    from qaas.api.deps import Caller
    from qaas.security import hash_api_key

    nowhere = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    with pytest.raises(direct.DatabaseUnavailable):
        asyncio.run(direct.fetch_one(nowhere, "SELECT 1"))
    down = make_settings(tmp_path / "down", database_url=nowhere, broker_url=redis_db)
    # the key is known (cached), so the request gets as far as the direct status read
    auth_cache.put(hash_api_key(api_key, down.secret_key.get_secret_value()), Caller("alice", "k"), 60)
    try:
        with TestClient(create_app(down), raise_server_exceptions=False) as c:
            r = c.get(f"/v1/jobs/{uuid.uuid4()}", headers=auth(api_key))
    finally:
        auth_cache.clear()
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and r.headers["retry-after"] == "2"


def test_submission_answers_even_when_the_broker_is_down_and_leaves_the_job_to_the_sweeper(tmp_path, clean_db, api_key):
    from fastapi.testclient import TestClient

    from qaas.api.app import create_app

    down = make_settings(tmp_path, database_url=clean_db, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(down), raise_server_exceptions=False) as c:
        r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                   headers=auth(api_key))
    assert r.status_code == 202, r.text
    with session_scope(clean_db) as s:
        job = s.get(Job, uuid.UUID(r.json()["id"]))
        assert job.status == "queued" and job.dispatched_at is None  # not marked: the sweeper sends it


def test_a_stuck_statement_times_out_as_unavailable_and_the_connection_stays_usable(settings, monkeypatch):
    db = settings.resolved_database_url
    monkeypatch.setattr(direct, "STATEMENT_TIMEOUT_MS", 200)

    async def scenario():
        with pytest.raises(direct.DatabaseUnavailable, match="timed out"):
            await direct.fetch_one(db, "SELECT pg_sleep(2)")
        pool = direct.pool_for(db)
        assert len(pool.idle) == 1  # kept: a cancelled statement does not break the connection
        assert await direct.fetch_one(db, "SELECT 41 + 1") == (42,)
        await direct.close_pools()

    asyncio.run(scenario())


def test_a_full_pool_makes_a_statement_wait_for_a_connection_but_not_forever(settings):
    db = settings.resolved_database_url

    async def scenario():
        pool = direct.Pool(db, size=1, acquire_timeout_s=0.3)
        held = asyncio.ensure_future(pool.run("SELECT pg_sleep(1)", (), fetch="one", retry=True))
        await asyncio.sleep(0.1)  # the only connection is busy
        with pytest.raises(direct.DatabaseUnavailable, match="no database connection free"):
            await pool.run("SELECT 1", (), fetch="one", retry=True)
        # a statement that waits less than the time-out gets the connection when it is returned
        pool.acquire_timeout_s = 5.0
        waiting = asyncio.ensure_future(pool.run("SELECT 2", (), fetch="one", retry=True))
        await held
        assert await waiting == (2,)
        assert await pool.run("SELECT 3", (), fetch="one", retry=True) == (3,)  # a free slot: at once
        await pool.close()

    asyncio.run(scenario())
