"""Status reads answered before FastAPI from the key and document caches (api/jobs/cached_status.py): the
same bytes and headers as the route, and everything the route decides (401, 404, another tenant, other
paths) still decided by the route; the rate limiter still counts every read."""

from __future__ import annotations

import time

from conftest import auth, make_settings, new_key
from fastapi.testclient import TestClient
from support.job_rows import listener_pids, store_job, wait_for

from qaas.api.app import create_app
from qaas.api.jobs import endpoints, reads


def _counting_route_reads(monkeypatch) -> list:
    """Calls that reached the route's read (the real function still runs)."""
    calls = []
    real = reads.job_json

    async def counted(*args, **kwargs):
        calls.append(args[1])
        return await real(*args, **kwargs)

    monkeypatch.setattr(endpoints.reads, "job_json", counted)
    return calls


def _client(tmp_path, clean_db, redis_db, **overrides):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, job_cache_s=60, **overrides)
    return settings, TestClient(create_app(settings), raise_server_exceptions=False)


def _warm(client, key, db, job_id):
    client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    wait_for(lambda: listener_pids(db), 10, "the listener subscribes")
    time.sleep(0.1)
    return client.get(f"/v1/jobs/{job_id}", headers=auth(key))  # stored by the route now


def test_a_cached_read_is_the_routes_answer_byte_for_byte_without_reaching_the_route(tmp_path, clean_db, redis_db,
                                                                                   monkeypatch):
    calls = _counting_route_reads(monkeypatch)
    settings, client = _client(tmp_path, clean_db, redis_db)
    key = new_key(settings, "alice")
    job_id = store_job(clean_db, "alice")
    with client:
        by_route = _warm(client, key, clean_db, job_id)
        reached = len(calls)
        fast = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
        assert len(calls) == reached  # answered before the route
        assert (fast.status_code, fast.headers.raw, fast.content) == (by_route.status_code, by_route.headers.raw,
                                                                      by_route.content)
        # the id written another way is the same job, as the route reads it
        upper = client.get(f"/v1/jobs/{str(job_id).upper()}", headers=auth(key))
        assert len(calls) == reached and upper.content == by_route.content


def test_what_the_route_decides_still_goes_to_the_route(tmp_path, clean_db, redis_db, monkeypatch):
    calls = _counting_route_reads(monkeypatch)
    settings, client = _client(tmp_path, clean_db, redis_db)
    alice, mallory = new_key(settings, "alice"), new_key(settings, "mallory")
    job_id = store_job(clean_db, "alice")
    with client:
        _warm(client, alice, clean_db, job_id)
        assert client.get("/v1/jobs", headers=auth(mallory)).status_code == 200  # mallory's key is cached now
        before = len(calls)
        r = client.get(f"/v1/jobs/{job_id}", headers=auth(mallory))  # another tenant: the route's 404
        assert r.status_code == 404 and len(calls) == before + 1
        assert client.get(f"/v1/jobs/{job_id}", headers=auth("qk_not_a_key")).status_code == 401
        assert client.get(f"/v1/jobs/{job_id}").status_code == 401
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Basic {alice}"}).status_code == 401
        assert client.get("/v1/jobs/not-an-id", headers=auth(alice)).status_code == 404
        events = client.get(f"/v1/jobs/{job_id}/events", headers=auth(alice))
        assert events.status_code == 200 and "items" in events.json()


def test_the_rate_limiter_counts_reads_answered_from_the_caches(tmp_path, clean_db, redis_db):
    settings, client = _client(tmp_path, clean_db, redis_db, rate_limit_per_minute=1, rate_limit_burst=3)
    key = new_key(settings, "alice")
    job_id = store_job(clean_db, "alice")
    with client:
        codes = [client.get(f"/v1/jobs/{job_id}", headers=auth(key)).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
