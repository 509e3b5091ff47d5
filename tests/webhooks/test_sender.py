"""One attempt of one outbox row (`qaas.webhooks.sender.deliver`), against a scripted loopback receiver, on
the real PostgreSQL: what is sent, what is recorded, and what it does to the endpoint."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from conftest import STORIES, make_settings
from sqlalchemy import select
from standardwebhooks import Webhook

from qaas import job_store
from qaas.db.models import DeliveryAttempt, JobStatus, WebhookDelivery, WebhookEndpoint
from qaas.db.session import session_scope
from qaas.security import encrypt_secret
from qaas.webhooks import sender, service
from qaas.webhooks.signing import generate_secret

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.fixture
def settings(tmp_path, clean_db, redis_db):
    return make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, webhook_allowlist="127.0.0.1",
                         webhook_retry_schedule_s="30,60")


def _finished_job(settings, *, own_url: str | None = None, own_secret: str | None = None) -> uuid.UUID:
    """A succeeded job; its outbox rows are written with the verdict."""
    key = settings.secret_key.get_secret_value()
    request = {"model": {"path": str(STORIES)}, "quantization_config": NF4,
               **({"webhook": {"url": own_url}} if own_url else {})}
    with session_scope(settings.database) as s:
        job = job_store.create_job(s, owner="alice", request=request, request_hash="h", idempotency_key=None,
                                   method="bitsandbytes", bits=4, source_model=str(STORIES), priority=0, max_attempts=1,
                                   webhook_secret_encrypted=encrypt_secret(own_secret, key) if own_secret else None)
        claimed = job_store.claim(s, job.id, worker="w", lease_s=30)
        job_store.finish(s, job.id, claimed.attempt, JobStatus.succeeded, result={"files": []})
        return job.id


def _deliveries(settings, job_id) -> list[WebhookDelivery]:
    with session_scope(settings.database) as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)))


def _attempts(settings, delivery_id) -> list[DeliveryAttempt]:
    with session_scope(settings.database) as s:
        return list(s.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)))


def _endpoint(settings, url: str) -> tuple[uuid.UUID, str]:
    with session_scope(settings.database) as s:
        created = service.create_endpoint(s, settings, "alice", url=url, event_types=["job.succeeded"], description=None)
        return created.endpoint.id, created.secret


def test_a_due_delivery_is_sent_signed_once_and_recorded(settings, receiver):
    secret = generate_secret()
    job_id = _finished_job(settings, own_url=receiver.url + "/own", own_secret=secret)
    [d] = _deliveries(settings, job_id)
    assert sender.deliver(settings, d.id) == "success"
    [got] = receiver.received
    body = Webhook(secret).verify(got.body, got.headers)
    assert got.path == "/own" and got.headers["webhook-id"] == d.msg_id
    assert body["type"] == "job.succeeded" and body["data"]["id"] == str(job_id)
    [row] = _deliveries(settings, job_id)
    assert (row.status, row.attempts, row.last_status_code, row.locked_until) == ("delivered", 1, 200, None)
    assert [a.outcome for a in _attempts(settings, d.id)] == ["success"]
    assert sender.deliver(settings, d.id) is None  # delivered: nothing left to send
    assert len(receiver.received) == 1


def test_a_failing_receiver_gets_the_next_attempt_on_the_schedule_and_the_same_webhook_id(settings, receiver):
    receiver.respond(503, 200)
    secret = generate_secret()
    job_id = _finished_job(settings, own_url=receiver.url, own_secret=secret)
    [d] = _deliveries(settings, job_id)
    assert sender.deliver(settings, d.id) == "retry"
    [row] = _deliveries(settings, job_id)
    wait = (row.next_attempt_at - row.created_at).total_seconds()
    assert row.status == "pending" and row.attempts == 1 and row.dispatched_at is None and 30 * 0.8 - 1 < wait < 30 * 1.2 + 5
    assert sender.deliver(settings, d.id) is None  # not due yet
    with session_scope(settings.database) as s:
        s.get(WebhookDelivery, d.id).next_attempt_at = row.created_at - dt.timedelta(seconds=1)
    assert sender.deliver(settings, d.id) == "success"
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert ids == {d.msg_id} and len(receiver.received) == 2
    assert [a.outcome for a in _attempts(settings, d.id)] == ["retry", "success"]


def test_410_disables_the_endpoint_and_no_secret_fails_without_sending(settings, receiver):
    receiver.respond(410)
    endpoint_id, _ = _endpoint(settings, receiver.url + "/gone")
    job_id = _finished_job(settings, own_url=receiver.url + "/own")  # the request's webhook, with no secret stored
    by_url = {d.url: d for d in _deliveries(settings, job_id)}
    assert sender.deliver(settings, by_url[receiver.url + "/gone"].id) == "gone"
    assert sender.deliver(settings, by_url[receiver.url + "/own"].id) == "failed"
    assert [r.path for r in receiver.received] == ["/gone"]  # an unsigned message is never sent
    with session_scope(settings.database) as s:
        ep = s.get(WebhookEndpoint, endpoint_id)
        assert ep.disabled_at is not None and "410" in ep.disabled_reason
        assert s.get(WebhookDelivery, by_url[receiver.url + "/own"].id).last_error.startswith("no signing secret")
    later = _finished_job(settings)  # a disabled endpoint hears of nothing new
    assert _deliveries(settings, later) == []


def test_running_out_of_attempts_flags_the_endpoint_and_a_success_clears_it(settings, receiver):
    settings = settings.model_copy(update={"webhook_retry_schedule_s": "0.01"})  # one retry, then none
    receiver.respond(500)
    endpoint_id, _ = _endpoint(settings, receiver.url)
    [d] = _deliveries(settings, _finished_job(settings))
    assert sender.deliver(settings, d.id) == "retry"
    with session_scope(settings.database) as s:
        s.get(WebhookDelivery, d.id).next_attempt_at = s.get(WebhookDelivery, d.id).created_at
    assert sender.deliver(settings, d.id) == "exhausted"
    with session_scope(settings.database) as s:
        assert s.get(WebhookEndpoint, endpoint_id).flagged_at is not None
        assert s.get(WebhookDelivery, d.id).status == "failed"
    receiver.respond(200)
    [d2] = _deliveries(settings, _finished_job(settings))
    assert sender.deliver(settings, d2.id) == "success"
    with session_scope(settings.database) as s:
        assert s.get(WebhookEndpoint, endpoint_id).flagged_at is None


def test_a_delivery_to_a_deleted_or_disabled_endpoint_is_dropped_unsent(settings, receiver):
    kept_id, _ = _endpoint(settings, receiver.url + "/kept")
    deleted_id, _ = _endpoint(settings, receiver.url + "/deleted")
    by_url = {d.url: d for d in _deliveries(settings, _finished_job(settings))}
    with session_scope(settings.database) as s:
        service.delete_endpoint(s, s.get(WebhookEndpoint, deleted_id))
        s.get(WebhookEndpoint, kept_id).disabled_at = by_url[receiver.url + "/kept"].created_at
    assert sender.deliver(settings, by_url[receiver.url + "/kept"].id) is None
    # the row outlives its endpoint (endpoint_id SET NULL): with no secret left it cannot be signed
    assert sender.deliver(settings, by_url[receiver.url + "/deleted"].id) == "failed"
    with session_scope(settings.database) as s:
        assert s.get(WebhookDelivery, by_url[receiver.url + "/kept"].id).status == "disabled"
        assert s.get(WebhookDelivery, by_url[receiver.url + "/deleted"].id).status == "failed"
    assert receiver.received == []
