"""kill -9 the engine child, then the whole worker, in the middle of a job -- real processes, by PID.

The engine here is the test-only fake (QAAS_FAKE_ENGINE=1): a real child process started by the real
supervisor with the real protocol, that sleeps per block instead of quantizing, so the kill lands in
the quantize stage every time and attempt 2 takes seconds. Publishing goes to the project's fake Hub
and the webhook to a real receiver, so "published and notified exactly once" is checked end to end.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
from chaos.helpers import NF4, fake_env, alive, engine_started, events, wait_dead, wait_progress
from conftest import STORIES, auth, make_settings, new_key
from sqlalchemy import update
from support.hub_fixtures import WRITE_TOKEN
from support.processes import wait_job
from support.receiver import Receiver

from qaas.db.models import Job
from qaas.db.session import session_scope

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def _settings(tmp_path, clean_db, redis_db, hub_url, **kw):
    return make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, webhook_allowlist="127.0.0.1",
                         hub_endpoint=hub_url, job_max_attempts=2, **kw)


def _submit(c: httpx.Client, receiver: Receiver, repo: str) -> tuple[str, str]:
    r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                 "options": {"evaluate": False}, "hf_token": WRITE_TOKEN,
                                 "push_to_hub": {"repo_id": repo}, "webhook": {"url": receiver.url}})
    assert r.status_code == 202, r.text
    return r.json()["id"], r.json()["webhook_secret"]


def _exactly_once(receiver: Receiver, jid: str, secret: str, hub, repo: str, event_type: str = "job.succeeded") -> None:
    from standardwebhooks import Webhook

    receiver.wait_for(1, timeout=30)
    time.sleep(2.5)  # time for a duplicate to show up, if there were one
    payloads = [Webhook(secret).verify(g.body, g.headers) for g in receiver.received]
    terminal = [p for p in payloads if p["type"] in ("job.succeeded", "job.failed", "job.cancelled")]
    assert [p["type"] for p in terminal] == [event_type], payloads
    assert terminal[0]["data"]["id"] == jid
    if event_type == "job.succeeded":
        assert hub.hub.count("POST", "commit") == 1  # published once, by the attempt that finished


def test_kill_engine_child_mid_quantization_retries_then_fails_when_attempts_run_out(
        chaos_stack, tmp_path, clean_db, redis_db, fake_hub, receiver):
    settings = _settings(tmp_path, clean_db, redis_db, fake_hub.url)
    stack = chaos_stack(settings, **fake_env(step_s=0.4))
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        jid, secret = _submit(c, receiver, "alice/chaos-child")
        pid = engine_started(c, jid, attempt=1)
        wait_progress(c, jid, "quantize", 2)
        attempt_dir = settings.work_dir / jid / "attempt-1"
        partial = list(attempt_dir.glob(".out.partial-*"))
        assert partial and any(partial[0].iterdir()), "the fake engine writes partial output while quantizing"

        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)
        pid2 = engine_started(c, jid, attempt=2, timeout=60)
        assert pid2 != pid and alive(pid2)
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=120)
        assert job["status"] == "succeeded" and job["attempt"] == 2, (job, worker.log()[-3000:])
        evs = events(c, jid)
        requeues = [e for e in evs if e["kind"] == "status" and (e["data"] or {}).get("status") == "queued"
                    and "after attempt 1" in e["message"]]
        assert len(requeues) == 1 and "engine process died" in requeues[0]["data"]["reason"]
        assert "quantize" in requeues[0]["data"]["reason"]
        # attempt 1's partial artefacts are gone; attempt 2 cleaned its own work dir after publishing
        assert not attempt_dir.exists() and not (settings.work_dir / jid / "attempt-2").exists()
        assert job["result"]["hub"]["repo_id"] == "alice/chaos-child"
        _exactly_once(receiver, jid, secret, fake_hub, "alice/chaos-child")

        # Attempts exhausted: the same kill fails the job with the reason, nothing left running.
        receiver.received.clear()
        jid2, secret2 = _submit(c, receiver, "alice/chaos-child-2")
        pid = engine_started(c, jid2, attempt=1)
        with session_scope(settings.resolved_database_url) as s:  # one attempt only, for this job
            s.execute(update(Job).where(Job.id == uuid.UUID(jid2)).values(max_attempts=1))
        wait_progress(c, jid2, "quantize", 1)
        os.kill(pid, signal.SIGKILL)
        job = wait_job(c, jid2, {"succeeded", "failed", "cancelled"}, timeout=60)
        assert job["status"] == "failed" and job["attempt"] == 1, job
        assert job["error"]["code"] == "engine_crashed"
        assert "died" in job["error"]["message"] and "no attempts left" in job["error"]["message"]
        assert job["error"]["stage"] == "quantize"
        assert not (settings.work_dir / jid2 / "attempt-1").exists()
        assert not (settings.artifacts_dir / jid2).exists()
        _exactly_once(receiver, jid2, secret2, fake_hub, "alice/chaos-child-2", event_type="job.failed")


def test_kill_whole_worker_child_dies_and_another_worker_takes_over_after_the_lease(
        chaos_stack, tmp_path, clean_db, redis_db, fake_hub, receiver):
    settings = _settings(tmp_path, clean_db, redis_db, fake_hub.url, lease_s=4.0)
    stack = chaos_stack(settings, **fake_env(step_s=0.4))
    _, url = stack.start_api()
    first = stack.start_worker("worker-1")
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        jid, secret = _submit(c, receiver, "alice/chaos-worker")
        child = engine_started(c, jid, attempt=1)
        wait_progress(c, jid, "quantize", 2)
        os.kill(first.pid, signal.SIGKILL)
        first.popen.wait(timeout=10)
        wait_dead(child, timeout=10)  # PR_SET_PDEATHSIG: the engine does not outlive its worker
        assert c.get(f"/v1/jobs/{jid}").json()["status"] == "running"  # nobody knows yet

        stack.start_worker("worker-2")
        pid2 = engine_started(c, jid, attempt=2, timeout=60)
        assert alive(pid2)
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=120)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job
        evs = events(c, jid)
        assert any("lease expired" in (e["message"] or "") for e in evs), [e["message"] for e in evs]
        assert not (settings.work_dir / jid / "attempt-1").exists()  # cleaned by attempt 2's claim
        _exactly_once(receiver, jid, secret, fake_hub, "alice/chaos-worker")
