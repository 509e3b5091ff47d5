"""Routes of the webhooks domain: account endpoints (`/v1/webhooks`) and a job's deliveries.

Thin: parse, authorize (everything is scoped to the caller's owner; another owner's endpoint or job is a
404), call `qaas.webhooks.service`, shape the answer.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response

from qaas import job_store
from qaas.api.deps import CallerDep, SessionDep, SettingsDep
from qaas.api.problems import Problem, invalid_field
from qaas.api.webhooks.schemas import (
    DeliveryOut,
    SecretRotated,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointOut,
)
from qaas.db.models import Job, WebhookEndpoint
from qaas.webhooks import service
from qaas.webhooks.urls import RefusedUrl

router = APIRouter(tags=["webhooks"])


def _not_found(what: str) -> Problem:
    return Problem(404, "Not found", f"no such {what}", slug="not-found")


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _not_found(what)


def _own_endpoint(session, caller, webhook_id: str) -> WebhookEndpoint:
    ep = service.own_endpoint(session, caller.owner, _uuid(webhook_id, "webhook"))
    if ep is None:
        raise _not_found("webhook")
    return ep


def _own_job(session, caller, job_id: str) -> Job:
    job = job_store.get_job(session, _uuid(job_id, "job"), caller.owner)
    if job is None:
        raise _not_found("job")
    return job


@router.post("/v1/webhooks", status_code=201, response_model=WebhookEndpointCreated, operation_id="create_webhook")
def create_webhook(body: WebhookEndpointIn, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Subscribe an endpoint to your jobs' events. The signing secret is in this response only."""
    try:
        created = service.create_endpoint(session, settings, caller.owner, url=str(body.url),
                                          event_types=body.event_types, description=body.description)
    except RefusedUrl as exc:
        raise invalid_field("url", exc.reason)
    return WebhookEndpointCreated.of(created.endpoint, secret=created.secret)


@router.get("/v1/webhooks", response_model=list[WebhookEndpointOut], operation_id="list_webhooks")
def list_webhooks(caller: CallerDep, session: SessionDep):
    return [WebhookEndpointOut.of(ep) for ep in service.list_endpoints(session, caller.owner)]


@router.delete("/v1/webhooks/{webhook_id}", status_code=204, operation_id="delete_webhook")
def delete_webhook(webhook_id: str, caller: CallerDep, session: SessionDep):
    service.delete_endpoint(session, _own_endpoint(session, caller, webhook_id))
    return Response(status_code=204)


@router.post("/v1/webhooks/{webhook_id}/rotate-secret", response_model=SecretRotated, operation_id="rotate_webhook_secret")
def rotate_secret(webhook_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """A new secret; the previous one stays valid for 24 hours (deliveries carry both signatures)."""
    rotated = service.rotate_secret(session, settings, _own_endpoint(session, caller, webhook_id))
    return SecretRotated(secret=rotated.secret, previous_secret_expires_at=rotated.previous_expire_at)


@router.get("/v1/jobs/{job_id}/deliveries", response_model=list[DeliveryOut], operation_id="list_job_deliveries", tags=["jobs"])
def list_deliveries(job_id: str, caller: CallerDep, session: SessionDep):
    """Every webhook delivery of the job, with every attempt."""
    job = _own_job(session, caller, job_id)
    return [DeliveryOut.of(log) for log in service.job_deliveries(session, job.id)]


@router.post("/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut,
             operation_id="redeliver", tags=["jobs"])
def redeliver(job_id: str, delivery_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Send a delivery again (same webhook-id, so receivers can de-duplicate)."""
    job = _own_job(session, caller, job_id)
    log = service.redeliver(session, settings, job.id, _uuid(delivery_id, "delivery"))
    if log is None:
        raise _not_found("delivery")
    return DeliveryOut.of(log)
