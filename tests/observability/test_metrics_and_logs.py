"""GET /metrics (scraped and parsed) and the JSON log lines of a job, against real processes."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import httpx
import pytest
from conftest import STORIES, auth, make_settings, new_key, settings_env
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from support.processes import Stack, wait_job

from qaas import job_store
from qaas.db.models import DeliveryAttempt, Job, JobStatus, WebhookDelivery, utcnow
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _job(s, owner="alice", priority=0):
    return job_store.create_job(s, owner=owner, request={"model": {"path": "/x"}}, request_hash="h", idempotency_key=None,
                                method="bitsandbytes", bits=4, source_model="/x", priority=priority, max_attempts=3)


def test_metrics_from_the_database_in_prometheus_format(client, settings):
    db = settings.resolved_database_url
    with session_scope(db) as s:
        q1, q2 = _job(s), _job(s, priority=5)
        s.execute(update(Job).where(Job.id == q1.id).values(created_at=utcnow() - dt.timedelta(seconds=120)))
        r = _job(s)
        done = _job(s)
    with session_scope(db) as s:
        assert job_store.claim(s, r.id, worker="host:1", lease_s=30)
        assert job_store.claim(s, done.id, worker="host:2", lease_s=30)
    with session_scope(db) as s:
        s.execute(update(Job).where(Job.id == done.id).values(attempt=2))
        assert job_store.finish(s, done.id, 2, JobStatus.succeeded, result={"files": [], "resources": {"peak_rss_bytes": 300 << 20}},
                                timings={"load": 1.5, "quantize": 42.0, "export": 0.2})
        d = WebhookDelivery(id=uuid.uuid4(), job_id=done.id, owner="alice", url="http://x", msg_id="msg_1",
                            event_type="job.succeeded", payload={}, status="delivered", attempts=2)
        s.add(d)
        s.flush()
        s.add_all([DeliveryAttempt(delivery_id=d.id, outcome="retry", status_code=500),
                   DeliveryAttempt(delivery_id=d.id, outcome="success", status_code=200)])

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = scrape(r.text)
    assert m[("qaas_jobs", (("state", "queued"),))] == 2
    assert m[("qaas_jobs", (("state", "running"),))] == 1
    assert m[("qaas_jobs", (("state", "succeeded"),))] == 1
    assert m[("qaas_jobs", (("state", "failed"),))] == 0
    assert m[("qaas_jobs_retried", (("state", "succeeded"),))] == 1
    assert m[("qaas_queue_depth", (("priority", "0"),))] == 1 and m[("qaas_queue_depth", (("priority", "5"),))] == 1
    assert 119 <= m[("qaas_queue_oldest_age_seconds", ())] < 200
    assert m[("qaas_job_stage_duration_seconds_count", (("stage", "quantize"),))] == 1
    assert m[("qaas_job_stage_duration_seconds_bucket", (("le", "30"), ("stage", "quantize")))] == 0
    assert m[("qaas_job_stage_duration_seconds_bucket", (("le", "60"), ("stage", "quantize")))] == 1
    assert m[("qaas_job_stage_duration_seconds_sum", (("stage", "load"),))] == 1.5
    assert m[("qaas_job_peak_memory_bytes_count", (("kind", "host_rss"),))] == 1
    assert m[("qaas_workers_busy", ())] == 1
    assert 0 <= m[("qaas_worker_heartbeat_age_seconds", (("worker", "host:1"),))] < 10
    assert m[("qaas_webhook_deliveries", (("status", "delivered"),))] == 1
    assert m[("qaas_webhook_delivery_attempts_total", (("outcome", "retry"),))] == 1
    assert m[("qaas_webhook_delivery_attempts_total", (("outcome", "success"),))] == 1
    # nothing tenant-identifying in the exposition
    assert "alice" not in r.text and str(done.id) not in r.text


@pytest.mark.slow
def test_job_log_lines_are_json_with_the_job_id_and_metrics_follow_the_real_stack(tmp_path, clean_db, redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db)
    stack = Stack(tmp_path, {**settings_env(settings), "QAAS_LOG_FORMAT": "json"})
    try:
        _, url = stack.start_api()
        worker = stack.start_worker()
        key = new_key(settings, "alice")
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
            before = scrape(httpx.get(url + "/metrics").text)
            jid = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                           "options": {"evaluate": False}}).json()["id"]
            job = wait_job(c, jid, {"succeeded", "failed"}, timeout=120)
            assert job["status"] == "succeeded", job
            assert job["result"]["resources"]["peak_rss_bytes"] > 50 << 20  # a torch process
            after = scrape(httpx.get(url + "/metrics").text)
        assert before[("qaas_jobs", (("state", "succeeded"),))] == 0
        assert after[("qaas_jobs", (("state", "succeeded"),))] == 1
        assert after[("qaas_job_stage_duration_seconds_count", (("stage", "quantize"),))] == 1
        assert after[("qaas_job_peak_memory_bytes_count", (("kind", "host_rss"),))] == 1
        time.sleep(0.5)
    finally:
        stack.stop_all()

    lines = [ln for ln in worker.log().splitlines() if ln.startswith("{")]
    records = [json.loads(ln) for ln in lines]  # every structured line parses
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    mine = [r for r in records if r.get("job_id") == jid]
    msgs = [r["msg"] for r in mine]
    assert any("claimed attempt 1" in m for m in msgs) and any("stage quantize" in m for m in msgs)
    assert any("attempt ended: succeeded" in m for m in msgs)
    assert all(r.get("attempt") == 1 for r in mine if "claimed" in r["msg"] or "stage" in r["msg"])
    # every line the worker's own code wrote about this job carries its id
    about = [r for r in records if jid in r["msg"] and r["logger"].startswith("qaas")]
    assert about and all(r.get("job_id") == jid for r in about)
    for proc in stack.procs:
        assert key not in proc.log()
    api_lines = [json.loads(ln) for ln in stack.procs[0].log().splitlines() if ln.startswith("{")]
    assert any(r["logger"] == "uvicorn.access" for r in api_lines)
