"""Routes: account webhooks (`/v1/webhooks`), job deliveries, and the saved Hub token (`/v1/hub-token`)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from fastapi import APIRouter, Response
from sqlalchemy import select

from qaas.api.deps import CallerDep, SessionDep, SettingsDep
from qaas.api.problems import Problem
from qaas.api.webhooks.schemas import (
    DeliveryOut,
    HubTokenIn,
    HubTokenStatus,
    SecretRotated,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointOut,
)
from qaas import job_store, outbox
from qaas.api.webhooks.service import delivery_out, job_deliveries
from qaas.db.models import HubCredential, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.kit.webhook_signing import generate_secret
from qaas.queue import send_delivery
from qaas.security import decrypt_secret, encrypt_secret
from qaas.api.webhook_urls import check_webhook_url

router = APIRouter(tags=["delivery"])
ROTATION_GRACE = dt.timedelta(hours=24)


def _not_found(what: str = "webhook") -> Problem:
    return Problem(404, "Not found", f"no such {what}", slug="not-found")


def _endpoint_out(ep: WebhookEndpoint, cls=WebhookEndpointOut, **extra):
    return cls(id=ep.id, url=ep.url, event_types=ep.event_types, description=ep.description, created_at=ep.created_at,
               disabled_at=ep.disabled_at, disabled_reason=ep.disabled_reason, flagged_at=ep.flagged_at, **extra)


@router.post("/v1/webhooks", status_code=201, response_model=WebhookEndpointCreated, operation_id="create_webhook")
def create_webhook(body: WebhookEndpointIn, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Subscribe an endpoint to your jobs' events. The signing secret is in this response only."""
    url = check_webhook_url(settings, str(body.url), field="url")
    secret = generate_secret()
    blob = json.dumps([{"secret": secret, "expires_at": None}])
    ep = WebhookEndpoint(id=uuid.uuid4(), owner=caller.owner, url=url, event_types=list(dict.fromkeys(body.event_types)),
                         description=body.description, created_at=utcnow(),
                         secrets_encrypted=encrypt_secret(blob, settings.secret_key.get_secret_value()))
    session.add(ep)
    session.commit()
    return _endpoint_out(ep, WebhookEndpointCreated, secret=secret)


@router.get("/v1/webhooks", response_model=list[WebhookEndpointOut], operation_id="list_webhooks")
def list_webhooks(caller: CallerDep, session: SessionDep):
    rows = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.owner == caller.owner)
                           .order_by(WebhookEndpoint.created_at)).all()
    return [_endpoint_out(ep) for ep in rows]


def _own_endpoint(session, caller, webhook_id: str) -> WebhookEndpoint:
    try:
        wid = uuid.UUID(webhook_id)
    except ValueError:
        raise _not_found()
    ep = session.get(WebhookEndpoint, wid)
    if ep is None or ep.owner != caller.owner:
        raise _not_found()
    return ep


@router.delete("/v1/webhooks/{webhook_id}", status_code=204, operation_id="delete_webhook")
def delete_webhook(webhook_id: str, caller: CallerDep, session: SessionDep):
    ep = _own_endpoint(session, caller, webhook_id)
    session.delete(ep)
    session.commit()
    return Response(status_code=204)


@router.post("/v1/webhooks/{webhook_id}/rotate-secret", response_model=SecretRotated, operation_id="rotate_webhook_secret")
def rotate_secret(webhook_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """A new secret; the previous one stays valid for 24 hours (deliveries carry both signatures)."""
    ep = _own_endpoint(session, caller, webhook_id)
    key = settings.secret_key.get_secret_value()
    now = utcnow()
    expires = now + ROTATION_GRACE
    old = [e for e in json.loads(decrypt_secret(ep.secrets_encrypted, key))
           if not e.get("expires_at") or e["expires_at"] > now.timestamp()]
    for e in old:
        e["expires_at"] = min(e.get("expires_at") or expires.timestamp(), expires.timestamp())
    secret = generate_secret()
    ep.secrets_encrypted = encrypt_secret(json.dumps([{"secret": secret, "expires_at": None}, *old]), key)
    session.commit()
    return SecretRotated(secret=secret, previous_secret_expires_at=expires)


def _own_job(session, caller, job_id: str):
    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        raise _not_found("job")
    job = job_store.get_job(session, jid, caller.owner)
    if job is None:
        raise _not_found("job")
    return job


@router.get("/v1/jobs/{job_id}/deliveries", response_model=list[DeliveryOut], operation_id="list_job_deliveries", tags=["jobs"])
def list_deliveries(job_id: str, caller: CallerDep, session: SessionDep):
    """Every webhook delivery of the job, with every attempt."""
    job = _own_job(session, caller, job_id)
    return job_deliveries(session, job.id)


@router.post("/v1/jobs/{job_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut,
             operation_id="redeliver", tags=["jobs"])
def redeliver(job_id: str, delivery_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Send a delivery again (same webhook-id, so receivers can de-duplicate)."""
    job = _own_job(session, caller, job_id)
    try:
        did = uuid.UUID(delivery_id)
    except ValueError:
        raise _not_found("delivery")
    d = session.get(WebhookDelivery, did)
    if d is None or d.job_id != job.id:
        raise _not_found("delivery")
    outbox.reset_for_redelivery(d)
    session.commit()
    send_delivery(settings, d.id)
    return delivery_out(session, d)


@router.put("/v1/hub-token", status_code=204, operation_id="put_hub_token")
def put_hub_token(body: HubTokenIn, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Save your Hub token (encrypted at rest, never returned) for jobs that bring none."""
    enc = encrypt_secret(body.token.get_secret_value(), settings.secret_key.get_secret_value())
    cred = session.get(HubCredential, caller.owner)
    if cred is None:
        session.add(HubCredential(owner=caller.owner, token_encrypted=enc, updated_at=utcnow()))
    else:
        cred.token_encrypted, cred.updated_at = enc, utcnow()
    session.commit()
    return Response(status_code=204)


@router.get("/v1/hub-token", response_model=HubTokenStatus, operation_id="get_hub_token_status")
def get_hub_token(caller: CallerDep, session: SessionDep):
    cred = session.get(HubCredential, caller.owner)
    return HubTokenStatus(configured=cred is not None, updated_at=cred.updated_at if cred else None)


@router.delete("/v1/hub-token", status_code=204, operation_id="delete_hub_token")
def delete_hub_token(caller: CallerDep, session: SessionDep):
    cred = session.get(HubCredential, caller.owner)
    if cred is not None:
        session.delete(cred)
        session.commit()
    return Response(status_code=204)
