"""Account webhooks, per-request webhook secrets, deliveries and the saved Hub token, via the API."""

from __future__ import annotations

import uuid

import pytest
from conftest import STORIES, auth
from sqlalchemy import select

from qaas import job_store
from qaas.db.models import HubCredential, Job, JobStatus, WebhookDelivery
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def test_webhook_endpoint_secret_is_shown_once(client, api_key, other_key):
    r = client.post("/v1/webhooks", json={"url": "https://hooks.example.com/qaas", "event_types": ["job.succeeded", "job.started"]},
                    headers=auth(api_key))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["secret"].startswith("whsec_") and created["event_types"] == ["job.succeeded", "job.started"]
    listed = client.get("/v1/webhooks", headers=auth(api_key)).json()
    assert [w["id"] for w in listed] == [created["id"]] and "secret" not in listed[0]
    assert client.get("/v1/webhooks", headers=auth(other_key)).json() == []
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=auth(other_key)).status_code == 404
    rotated = client.post(f"/v1/webhooks/{created['id']}/rotate-secret", headers=auth(api_key)).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=auth(api_key)).status_code == 204
    assert client.get("/v1/webhooks", headers=auth(api_key)).json() == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.5/x", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/", "http://2130706433/", "ftp://example.com/x",
    "http://user:pw@example.com/x",
])
def test_private_and_odd_webhook_urls_are_refused(client, api_key, settings, url):
    r = client.post("/v1/webhooks", json={"url": url}, headers=auth(api_key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "url", r.text
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4, "webhook": {"url": url}},
                    headers=auth(api_key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"].startswith("webhook"), r.text
    with session_scope(settings.resolved_database_url) as s:
        assert s.scalar(select(Job.id)) is None


def test_request_webhook_secret_is_generated_once_and_the_outbox_is_written_with_the_verdict(client, api_key, settings):
    h = {**auth(api_key), "Idempotency-Key": "w1"}
    body = {"model": {"path": str(STORIES)}, "quantization_config": NF4, "webhook": {"url": "https://hooks.example.com/x"}}
    first = client.post("/v1/jobs", json=body, headers=h).json()
    assert first["webhook_secret"].startswith("whsec_")
    again = client.post("/v1/jobs", json=body, headers=h).json()
    assert again["id"] == first["id"] and again["webhook_secret"] is None  # shown once
    got = client.get(f"/v1/jobs/{first['id']}", headers=auth(api_key)).json()
    assert "webhook_secret" not in got and "secret" not in got["request"]["webhook"]
    jid = uuid.UUID(first["id"])
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, jid, worker="w", lease_s=5)
        assert s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == jid)).all() == []  # started: endpoints only
        job_store.finish(s, jid, job.attempt, JobStatus.succeeded, result={"files": []})
    deliveries = client.get(f"/v1/jobs/{jid}/deliveries", headers=auth(api_key)).json()
    assert len(deliveries) == 1
    d = deliveries[0]
    assert d["event_type"] == "job.succeeded" and d["status"] == "pending" and d["webhook_id"].startswith("msg_")
    assert d["endpoint_id"] is None and d["url"] == "https://hooks.example.com/x"


def test_cancelling_a_queued_job_announces_it_to_subscribed_endpoints(client, api_key, settings):
    client.post("/v1/webhooks", json={"url": "https://hooks.example.com/a", "event_types": ["job.cancelled"]}, headers=auth(api_key))
    client.post("/v1/webhooks", json={"url": "https://hooks.example.com/b", "event_types": ["job.succeeded"]}, headers=auth(api_key))
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4}, headers=auth(api_key)).json()["id"]
    client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key))
    deliveries = client.get(f"/v1/jobs/{jid}/deliveries", headers=auth(api_key)).json()
    assert [(d["url"], d["event_type"]) for d in deliveries] == [("https://hooks.example.com/a", "job.cancelled")]


def test_deliveries_are_tenant_isolated(client, api_key, other_key):
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4}, headers=auth(api_key)).json()["id"]
    assert client.get(f"/v1/jobs/{jid}/deliveries", headers=auth(other_key)).status_code == 404
    assert client.post(f"/v1/jobs/{jid}/deliveries/{uuid.uuid4()}/redeliver", headers=auth(other_key)).status_code == 404


def test_hub_token_is_write_only_and_encrypted(client, api_key, other_key, settings):
    token = "hf_" + "s3cr3t" * 6
    assert client.get("/v1/hub-token", headers=auth(api_key)).json() == {"configured": False, "updated_at": None}
    assert client.put("/v1/hub-token", json={"token": token}, headers=auth(api_key)).status_code == 204
    status = client.get("/v1/hub-token", headers=auth(api_key))
    assert status.json()["configured"] is True and token not in status.text
    assert client.get("/v1/hub-token", headers=auth(other_key)).json()["configured"] is False
    with session_scope(settings.resolved_database_url) as s:
        stored = s.get(HubCredential, "alice").token_encrypted
    assert token.encode() not in stored
    assert client.put("/v1/hub-token", json={"token": "has space"}, headers=auth(api_key)).status_code == 422
    assert client.delete("/v1/hub-token", headers=auth(api_key)).status_code == 204
    assert client.get("/v1/hub-token", headers=auth(api_key)).json()["configured"] is False


def test_job_hf_token_is_never_returned(client, api_key, settings):
    token = "hf_" + "q" * 30
    r = client.post("/v1/jobs", json={"model": {"id": "org/model"}, "quantization_config": NF4, "hf_token": token},
                    headers=auth(api_key))
    assert r.status_code == 202 and token not in r.text
    jid = r.json()["id"]
    for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/events", "/v1/jobs"):
        assert token not in client.get(path, headers=auth(api_key)).text
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, uuid.UUID(jid))
        assert job.hf_token_encrypted and token.encode() not in job.hf_token_encrypted
        assert token not in str(job.request)
        j = job_store.claim(s, job.id, worker="w", lease_s=5)
        job_store.finish(s, job.id, j.attempt, JobStatus.failed, error={"code": "x", "message": "y"})
    with session_scope(settings.resolved_database_url) as s:
        assert s.get(Job, uuid.UUID(jid)).hf_token_encrypted is None  # wiped with the verdict


def test_dashboard_lists_the_same_deliveries_as_the_api(client, api_key, settings):
    from qaas.api.dashboard import views

    body = {"model": {"path": str(STORIES)}, "quantization_config": NF4, "webhook": {"url": "https://hooks.example.com/x"}}
    jid = uuid.UUID(client.post("/v1/jobs", json=body, headers=auth(api_key)).json()["id"])
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, jid, worker="w", lease_s=5)
        job_store.finish(s, jid, job.attempt, JobStatus.failed, error={"code": "x", "message": "y"})
    api = client.get(f"/v1/jobs/{jid}/deliveries", headers=auth(api_key)).json()
    with session_scope(settings.resolved_database_url) as s:
        page = views.list_deliveries(s, jid)
    assert [(d["event_type"], d["status"], d["url"]) for d in page] == [(d["event_type"], d["status"], d["url"]) for d in api]
    assert page[0]["event_type"] == "job.failed"
