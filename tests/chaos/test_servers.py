"""Restart Redis and PostgreSQL under a working service; the servers are the test's own, on free ports."""

from __future__ import annotations

import time

import httpx
import pytest
from chaos.helpers import fake_env, wait_progress
from conftest import STORIES, auth, make_settings, new_key
from support.processes import wait_job

from qaas.db.migrate import upgrade

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
JOB = {"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False}}


def _all_final(c: httpx.Client, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [c.get(f"/v1/jobs/{j}").json() for j in ids]
        if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError([(j["id"], j["status"]) for j in jobs])
        time.sleep(0.3)


def test_redis_restart_loses_no_job(chaos_stack, tmp_path, clean_db, own_redis):
    # Messages sent but never claimed are re-sent after REDISPATCH_AFTER_S (seconds here, minutes in production).
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=own_redis.url, redispatch_after_s=3.0)
    stack = chaos_stack(settings, **fake_env(step_s=0.15))
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        ids = [c.post("/v1/jobs", json=JOB).json()["id"] for _ in range(6)]
        wait_progress(c, ids[0], "quantize", 1)  # one running, five queued (in Redis)
        statuses = [c.get(f"/v1/jobs/{j}").json()["status"] for j in ids]
        assert statuses[0] == "running" and statuses.count("queued") >= 4, statuses

        own_redis.kill()  # every queued message is gone with it
        # submissions while the broker is down are accepted (stored; the sweeper sends them later)
        r = c.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        assert c.get("/readyz").status_code == 503
        time.sleep(1.5)
        own_redis.start()  # empty: nothing on disk

        jobs = _all_final(c, ids, timeout=150)
        assert [j["status"] for j in jobs] == ["succeeded"] * len(ids), (jobs, worker.log()[-4000:])
        assert all(j["attempt"] == 1 for j in jobs), [j["attempt"] for j in jobs]  # none ran twice
        # the worker reconnected and keeps consuming new work
        late = c.post("/v1/jobs", json=JOB).json()["id"]
        assert wait_job(c, late, {"succeeded", "failed"}, timeout=60)["status"] == "succeeded"
        assert c.get("/readyz").status_code == 200
    assert worker.popen.poll() is None


def test_postgres_restart_mid_job_api_503_then_recovers_and_job_completes(chaos_stack, tmp_path, redis_db, own_postgres):
    db_url = own_postgres.create_database()
    upgrade(db_url)
    # the lease outlives the outage (as 60 s does in production): the worker keeps the job through it
    settings = make_settings(tmp_path, database_url=db_url, broker_url=redis_db, lease_s=30.0)
    stack = chaos_stack(settings, **fake_env(step_s=0.5))
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        jid = c.post("/v1/jobs", json=JOB).json()["id"]
        wait_progress(c, jid, "quantize", 1)

        own_postgres.stop("fast")
        t0 = time.monotonic()
        seen_503 = 0
        while time.monotonic() - t0 < 4.0:  # the engine keeps reporting progress into a database that is down
            r = c.get(f"/v1/jobs/{jid}")
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers.get("retry-after") and r.json()["status"] == 503
            seen_503 += 1
            time.sleep(0.3)
        assert c.get("/readyz").status_code == 503
        own_postgres.start()

        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=120)  # the API recovered by itself
        assert job["status"] == "succeeded" and job["attempt"] == 1, (job, worker.log()[-4000:])
        assert seen_503 >= 5
        assert "database unavailable" in worker.log()  # the worker's writes retried
        assert c.get("/readyz").status_code == 200
        # the worker is still serving
        nxt = c.post("/v1/jobs", json=JOB).json()["id"]
        assert wait_job(c, nxt, {"succeeded", "failed"}, timeout=60)["status"] == "succeeded"
