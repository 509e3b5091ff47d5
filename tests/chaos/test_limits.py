"""A full disk, a job past its time limit, and a backlog drained in order -- real engine where it matters."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from chaos.conftest import fill
from chaos.helpers import NF4, engine_started, fake_env, wait_dead
from conftest import STORIES, auth, make_settings, new_key
from sqlalchemy import select
from support.processes import wait_job

from qaas.db.models import Job, JobEvent
from qaas.db.session import session_scope

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_full_disk_fails_the_job_with_no_space_and_the_service_keeps_serving(chaos_stack, tmp_path, clean_db, redis_db,
                                                                              small_disk):
    # The data directory (work dirs, artefacts) lives on a 4 MiB tmpfs; the real engine writes the model there.
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, data_dir=small_disk / "data")
    stack = chaos_stack(settings)
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    filler = fill(small_disk, leave_bytes=64 * 1024)  # the NF4 stories260K output needs ~300 KB
    body = {"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False}}
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        jid = c.post("/v1/jobs", json=body).json()["id"]
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=120)
        assert job["status"] == "failed", (job, worker.log()[-3000:])
        assert job["error"]["code"] == "no_space", job["error"]
        assert "no space" in job["error"]["message"].lower()
        assert job["attempt"] == 1  # a full disk is not retried blindly
        assert not (settings.work_dir / jid).exists() or not any((settings.work_dir / jid).iterdir())
        assert not (settings.artifacts_dir / jid).exists()
        # the service keeps serving: reads work, and once space is freed the next job succeeds
        assert c.get("/v1/jobs").status_code == 200 and c.get("/healthz").status_code == 200
        filler.unlink()
        nxt = c.post("/v1/jobs", json=body).json()["id"]
        done = wait_job(c, nxt, {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "succeeded", done
    assert worker.popen.poll() is None


def test_job_over_its_time_limit_is_stopped_child_killed_and_failed_with_the_reason(chaos_stack, tmp_path, clean_db, redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db)
    stack = chaos_stack(settings)  # the real engine: a torch process that must be killed
    _, url = stack.start_api()
    stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        # evaluation on many windows keeps the engine busy far longer than the limit
        jid = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                       "options": {"eval_max_windows": 1000, "time_limit_s": 6}}).json()["id"]
        pid = engine_started(c, jid, attempt=1)
        t0 = time.monotonic()
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=90)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "time_limit" and "time limit of 6 s" in job["error"]["message"]
        assert job["attempt"] == 1 and time.monotonic() - t0 < 30
        wait_dead(pid, timeout=5)  # the engine (and with it the GPU) was freed
        assert not (settings.work_dir / jid / "attempt-1").exists()


def test_backlog_drains_in_priority_then_age_order_none_lost_or_duplicated(chaos_stack, tmp_path, clean_db, redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db)
    stack = chaos_stack(settings, **fake_env(step_s=0.0))
    _, url = stack.start_api()
    key = new_key(settings, "alice")
    body = {"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False}}
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        ids = []
        for i in range(40):  # queued with no worker running
            prio = [0, 5, 9, 2][i % 4]
            ids.append(c.post("/v1/jobs", json={**body, "options": {"evaluate": False, "priority": prio}}).json()["id"])
        stack.start_worker()
        deadline = time.monotonic() + 150
        while c.get("/v1/jobs", params={"status": "succeeded", "limit": 200}).json()["items"].__len__() < len(ids):
            assert time.monotonic() < deadline, "backlog did not drain"
            time.sleep(0.5)
    with session_scope(settings.resolved_database_url) as s:
        jobs = s.scalars(select(Job).where(Job.id.in_([uuid.UUID(i) for i in ids]))).all()
        assert len(jobs) == 40 and all(j.status == "succeeded" and j.attempt == 1 for j in jobs)
        running = s.scalars(select(JobEvent).where(JobEvent.kind == "status", JobEvent.message.like("running on %"))
                            .order_by(JobEvent.id)).all()
        assert len(running) == 40  # each job started exactly once
    by_id = {str(j.id): j for j in jobs}
    order = [str(e.job_id) for e in running]
    expected = sorted(ids, key=lambda i: (-by_id[i].priority, by_id[i].created_at))
    assert order == expected
