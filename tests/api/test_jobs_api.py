"""The jobs API in-process over real PostgreSQL and Redis: routes, error shapes, auth, isolation."""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import STORIES, auth, new_key
from sqlalchemy import func, select

from qaas import job_store
from qaas.db.models import Job, JobEvent, JobStatus
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def body(**over):
    b = {"model": {"path": str(STORIES)}, "quantization_config": dict(NF4)}
    b.update(over)
    return b


def job_count(settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


def assert_problem(r, status: int, field: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert p["status"] == status and p["title"] and p["type"].startswith("https://")
    if field is not None:
        assert field in [e["field"] for e in p["errors"]], p
    return p


def test_submit_returns_202_location_and_queues_a_message(client, api_key, settings, redis_db):
    import redis

    r = client.post("/v1/jobs", json=body(), headers=auth(api_key))
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["method"] == "bitsandbytes" and job["bits"] == 4
    # defaults of BitsAndBytesConfig are filled in, the recipe is stored as submitted
    assert job["request"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert job["request"]["quantization_config"]["llm_int8_threshold"] == 6.0
    # the message went to the job's queue on Redis, carrying only the id (kombu keeps one list per
    # priority level; priority 0 -- "runs last" -- is broker priority 9, the list "<queue>\x06\x169")
    from qaas.queue import broker_priority

    raw = redis.Redis.from_url(redis_db).lrange(f"{settings.gpu_queue}\x06\x16{broker_priority(0)}", 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert json.loads(__import__("base64").b64decode(message["body"]))[0] == [job["id"]]
    with session_scope(settings.resolved_database_url) as s:
        assert s.get(Job, uuid.UUID(job["id"])).dispatched_at is not None


def test_get_list_and_cursor_pagination(client, api_key):
    ids = [client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"] for _ in range(5)]
    got = client.get(f"/v1/jobs/{ids[0]}", headers=auth(api_key)).json()
    assert got["id"] == ids[0] and got["links"]["events"].endswith("/events")
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/jobs", params=params, headers=auth(api_key)).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    assert_problem(client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=auth(api_key)), 422, "cursor")
    assert_problem(client.get("/v1/jobs", params={"status": "bogus"}, headers=auth(api_key)), 422, "status")


def test_filter_by_status(client, api_key):
    a = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    client.post("/v1/jobs", json=body(), headers=auth(api_key))
    client.post(f"/v1/jobs/{a}/cancel", headers=auth(api_key))
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth(api_key)).json()["items"]
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=auth(api_key)).json()["items"]
    assert [j["id"] for j in cancelled] == [a]
    assert len(queued) == 1 and queued[0]["id"] != a


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 5, "dataset": "c4"}}, "quantization_config.bits"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -8, "dataset": "c4"}}, "quantization_config.group_size"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 0, "dataset": "c4"}}, "quantization_config.group_size"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config.dataset"),
        ({"quantization_config": {**NF4, "dataset": "c4"}}, "quantization_config.dataset"),
        ({"quantization_config": {**NF4, "bits": 3}}, "quantization_config.bits"),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True}}, "quantization_config.load_in_4bit"),
        ({"quantization_config": {**NF4, "bnb_4bit_quant_storage": "bfloat16"}}, "quantization_config.bnb_4bit_quant_storage"),
        ({"quantization_config": {**NF4, "bnb_4bit_quant_type": "int4"}}, "quantization_config.bnb_4bit_quant_type"),
        ({"quantization_config": {**NF4, "surprise": 1}}, "quantization_config.surprise"),
        ({"model": {"id": "../../etc/passwd"}}, "model.id"),
        ({"model": {"id": "org/name", "revision": "main; rm -rf /"}}, "model.revision"),
        ({"model": {"id": "org/name", "revision": "../refs"}}, "model.revision"),
        ({"model": {"path": "/etc"}}, "model.path"),
        ({"model": {"path": "relative/dir"}}, "model.path"),
        ({"model": {}}, "model"),
        ({"webhook": {"url": "ftp://example.com/hook"}}, "webhook.url"),
        ({"options": {"priority": 99}}, "options.priority"),
    ],
)
def test_bad_requests_are_422_naming_the_field_and_store_nothing(client, api_key, settings, payload, field):
    before = job_count(settings)
    p = assert_problem(client.post("/v1/jobs", json=body(**payload), headers=auth(api_key)), 422)
    fields = [e["field"] for e in p["errors"]]
    assert any(f == field or f.startswith(field + ".") for f in fields), fields
    assert job_count(settings) == before


def test_local_path_symlink_escaping_the_roots_is_refused(client, api_key, settings, tmp_path):
    link = tmp_path / "escape"
    link.symlink_to("/etc")
    assert_problem(client.post("/v1/jobs", json=body(model={"path": str(link)}), headers=auth(api_key)), 422, "model.path")


def test_malformed_json_wrong_types_and_oversize(client, api_key, settings):
    assert_problem(client.post("/v1/jobs", content=b"{not json", headers={**auth(api_key), "content-type": "application/json"}), 422, "body")
    assert_problem(client.post("/v1/jobs", json=body(quantization_config={**NF4, "load_in_4bit": "sometimes"}), headers=auth(api_key)), 422)
    assert_problem(client.post("/v1/jobs", json=[1, 2], headers=auth(api_key)), 422)
    huge = body(quantization_config={"quant_method": "gptq", "bits": 4, "dataset": ["x" * 1024] * (settings.max_request_bytes // 1024 + 10)})
    assert_problem(client.post("/v1/jobs", json=huge, headers=auth(api_key)), 413, "body")
    assert job_count(settings) == 0


def test_auth_is_required_and_keys_are_hashed_at_rest(client, api_key, settings):
    assert_problem(client.get("/v1/jobs"), 401)
    assert_problem(client.get("/v1/jobs", headers={"Authorization": "Bearer qaas_wrong"}), 401)
    assert_problem(client.get("/v1/jobs", headers={"Authorization": f"Basic {api_key}"}), 401)
    assert client.get("/v1/jobs", headers=auth(api_key)).status_code == 200
    from qaas.db.models import ApiKey

    with session_scope(settings.resolved_database_url) as s:
        stored = [tuple(r) for r in s.execute(select(ApiKey.key_hash, ApiKey.prefix, ApiKey.name, ApiKey.owner))]
    assert stored and all(api_key not in "".join(map(str, row)) for row in stored)


def test_revoked_key_is_refused(client, settings):
    from qaas.db.session import session_scope
    from qaas.keys import revoke_keys
    from qaas.security import key_display_prefix

    key = new_key(settings, "carol")
    assert client.get("/v1/jobs", headers=auth(key)).status_code == 200
    with session_scope(settings.resolved_database_url) as s:
        assert revoke_keys(s, key_display_prefix(key)) == 1
    assert_problem(client.get("/v1/jobs", headers=auth(key)), 401)


def test_tenants_are_isolated(client, api_key, other_key, settings):
    mine = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    for method, path in [("get", f"/v1/jobs/{mine}"), ("post", f"/v1/jobs/{mine}/cancel"),
                         ("get", f"/v1/jobs/{mine}/events"), ("get", f"/v1/jobs/{mine}/files/config.json")]:
        assert_problem(getattr(client, method)(path, headers=auth(other_key)), 404)
    assert client.get("/v1/jobs", headers=auth(other_key)).json()["items"] == []
    # a second key of the same tenant sees the job
    same_tenant = new_key(settings, "alice", name="second")
    assert client.get(f"/v1/jobs/{mine}", headers=auth(same_tenant)).status_code == 200
    assert client.get(f"/v1/jobs/{mine}", headers=auth(api_key)).json()["status"] == "queued"
    assert_problem(client.get("/v1/jobs/not-a-uuid", headers=auth(api_key)), 404)


def test_idempotency_key(client, api_key, other_key, settings):
    h = {**auth(api_key), "Idempotency-Key": "abc-123"}
    first = client.post("/v1/jobs", json=body(), headers=h)
    again = client.post("/v1/jobs", json=body(), headers=h)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert job_count(settings) == 1
    different = client.post("/v1/jobs", json=body(options={"priority": 3}), headers=h)
    assert_problem(different, 422, "Idempotency-Key")
    # keys are per tenant: another tenant's identical key makes its own job
    theirs = client.post("/v1/jobs", json=body(), headers={**auth(other_key), "Idempotency-Key": "abc-123"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    assert job_count(settings) == 2


def test_cancel_queued_job_and_conflict_when_finished(client, api_key, settings):
    jid = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    r = client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key))
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key)), 409)
    # the worker finds nothing to claim afterwards (a late message is harmless)
    with session_scope(settings.resolved_database_url) as s:
        assert job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5) is None


def test_cancel_running_job_sets_the_flag(client, api_key, settings):
    jid = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        assert job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5) is not None
    r = client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key))
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


def _succeed_job(settings, jid: str, files: dict[str, bytes]) -> None:
    root = settings.artifacts_dir / jid
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        result = {"files": [{"name": n, "size": len(d)} for n, d in files.items()]}
        assert job_store.finish(s, job.id, job.attempt, JobStatus.succeeded, result=result)


def test_result_lists_files_and_download_streams_them(client, api_key, other_key, settings):
    jid = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    payload = bytes(range(256)) * 1000
    _succeed_job(settings, jid, {"model.safetensors": payload, "config.json": b"{}"})
    job = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert {f["name"]: f["size"] for f in job["files"]} == {"model.safetensors": len(payload), "config.json": 2}
    r = client.get(f"/v1/jobs/{jid}/files/model.safetensors", headers=auth(api_key))
    assert r.status_code == 200 and r.content == payload
    assert_problem(client.get(f"/v1/jobs/{jid}/files/..%2F..%2Fqaas.db", headers=auth(api_key)), 404)
    assert_problem(client.get(f"/v1/jobs/{jid}/files/nope.bin", headers=auth(api_key)), 404)
    assert_problem(client.get(f"/v1/jobs/{jid}/files/config.json", headers=auth(other_key)), 404)


def test_events_timeline_and_sse_stream(client, api_key, settings):
    jid = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        job_store.record_stage(s, job.id, job.attempt, "quantize", message="quantizing", timings={"load": 0.5})
        job_store.record_progress(s, job.id, job.attempt, stage="quantize", fraction=0.5, message="block 1/2", data={"done": 1, "total": 2})
    page = client.get(f"/v1/jobs/{jid}/events", headers=auth(api_key)).json()
    kinds = [e["kind"] for e in page["items"]]
    assert kinds == ["status", "status", "stage", "progress"] and page["job_status"] == "running"
    after = page["items"][1]["id"]
    assert [e["kind"] for e in client.get(f"/v1/jobs/{jid}/events", params={"after": after}, headers=auth(api_key)).json()["items"]] == ["stage", "progress"]
    with session_scope(settings.resolved_database_url) as s:
        assert job_store.finish(s, job.id, job.attempt, JobStatus.failed, error={"code": "x", "message": "boom"})
    # SSE: everything after Last-Event-ID, then an end event once the job is over
    r = client.get(f"/v1/jobs/{jid}/events", headers={**auth(api_key), "Accept": "text/event-stream", "Last-Event-ID": str(after)})
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in r.text.split("\n\n") if f.startswith("id:") or f.startswith("event: end")]
    assert [next(line for line in f.split("\n") if line.startswith("event:")) for f in frames] == [
        "event: stage", "event: progress", "event: status", "event: end"]
    ids = [int(f.split("\n")[0][4:]) for f in frames[:-1]]
    assert ids == sorted(ids) and ids[0] > after


def test_failed_job_shows_its_error(client, api_key, settings):
    jid = client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        job_store.finish(s, job.id, job.attempt, JobStatus.failed, error={"code": "source_rejected", "message": "pickle", "stage": "resolve"})
    job = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    assert job["status"] == "failed" and job["error"] == {"code": "source_rejected", "message": "pickle", "stage": "resolve", "field": None}
    assert job["files"] is None


def test_health_ready_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    spec = client.get("/openapi.json").json()
    ops = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"create_job", "get_job", "list_jobs", "cancel_job", "list_job_events", "download_job_file", "readyz"} <= ops


def test_readyz_reports_a_dead_broker(tmp_path, clean_db):
    from fastapi.testclient import TestClient

    from conftest import make_settings
    from qaas.api.app import create_app

    s = make_settings(tmp_path, database_url=clean_db, broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(s)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"] == {"database": "ok", "broker": "down"}


def test_job_accepted_while_broker_down_is_dispatched_by_the_sweeper(tmp_path, clean_db, redis_db):
    """The row commits even when Redis is unreachable; the sweeper sends the message later."""
    from fastapi.testclient import TestClient

    from conftest import make_settings
    from qaas.api.app import create_app
    from qaas.worker.sweeper import sweep_once

    down = make_settings(tmp_path, database_url=clean_db, broker_url="redis://127.0.0.1:1/0")
    key = new_key(down, "alice")
    with TestClient(create_app(down)) as c:
        r = c.post("/v1/jobs", json=body(), headers=auth(key))
    assert r.status_code == 202
    jid = r.json()["id"]
    with session_scope(down.resolved_database_url) as s:
        assert s.get(Job, uuid.UUID(jid)).dispatched_at is None
    up = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, gpu_queue=down.gpu_queue)
    assert sweep_once(up)["dispatched"] == 1
    from qaas.queue import gpu_queue_depth

    assert gpu_queue_depth(up) == 1  # one message, whichever priority list it sits in
    assert sweep_once(up)["dispatched"] == 0  # not sent twice while fresh


def test_duplicate_claim_and_fenced_writes(client, api_key, settings):
    jid = uuid.UUID(client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"])
    with session_scope(settings.resolved_database_url) as s:
        first = job_store.claim(s, jid, worker="w1", lease_s=5)
    with session_scope(settings.resolved_database_url) as s:
        assert job_store.claim(s, jid, worker="w2", lease_s=5) is None  # duplicate delivery does nothing
        assert job_store.requeue_for_retry(s, jid, first.attempt, "lost")
    with session_scope(settings.resolved_database_url) as s:
        second = job_store.claim(s, jid, worker="w2", lease_s=5)
        assert second.attempt == 2
    with session_scope(settings.resolved_database_url) as s:
        # the first worker, back from the dead, can no longer write
        assert not job_store.finish(s, jid, 1, JobStatus.succeeded, result={})
        assert not job_store.record_progress(s, jid, 1, stage="x", fraction=0.1, message="stale", data=None)
        assert job_store.finish(s, jid, 2, JobStatus.succeeded, result={"files": []})
        events = s.scalars(select(JobEvent.message).where(JobEvent.job_id == jid)).all()
    assert not any("stale" in (m or "") for m in events)


def test_expired_lease_is_requeued_then_failed_when_attempts_run_out(client, api_key, settings):
    import datetime as dt

    from sqlalchemy import update

    from qaas.worker.sweeper import sweep_once

    jid = uuid.UUID(client.post("/v1/jobs", json=body(), headers=auth(api_key)).json()["id"])
    for attempt in range(1, settings.job_max_attempts + 1):
        with session_scope(settings.resolved_database_url) as s:
            job = job_store.claim(s, jid, worker="w", lease_s=5)
            assert job.attempt == attempt
            s.execute(update(Job).where(Job.id == jid).values(lease_expires_at=job.lease_expires_at - dt.timedelta(seconds=60)))
        counts = sweep_once(settings)
        expected = "requeued" if attempt < settings.job_max_attempts else "failed"
        assert counts[expected] == 1
    job = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"


def test_awq_on_an_architecture_without_a_scaling_map_is_422_at_submission(client, api_key, settings, tmp_path):
    """AWQ folds its scales into the layers before; for a model_type it has no map of (GPT-2's fused c_attn),
    a local model is refused when submitted, naming the field, and nothing is stored."""
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "dataset": ["calibration text " * 40]}
    before = job_count(settings)
    p = assert_problem(client.post("/v1/jobs", json=body(model={"path": str(gpt2)}, quantization_config=awq),
                                   headers=auth(api_key)), 422, "model")
    assert "gpt2" in json.dumps(p) and "llama" in json.dumps(p)
    assert job_count(settings) == before
    # the same request for a Llama is accepted
    r = client.post("/v1/jobs", json=body(quantization_config=awq), headers=auth(api_key))
    assert r.status_code == 202, r.text
