"""The webhooks service: an account's endpoints and a job's deliveries. Sessions are passed in.

Every function is scoped to an owner (the tenant): another owner's endpoint or delivery is not found,
never shown. The API's router (`qaas.api.webhooks.endpoints`) parses, authorizes the caller and calls
these; the dashboard reads a job's deliveries through `job_deliveries` too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from qaas.db.models import DeliveryAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.queue import send_delivery
from qaas.settings import Settings
from qaas.webhooks import outbox, secret_list
from qaas.webhooks.urls import check_webhook_url


@dataclass(frozen=True)
class Created:
    endpoint: WebhookEndpoint
    #: The signing secret, shown to the caller this once.
    secret: str


def create_endpoint(session: Session, settings: Settings, owner: str, *, url: str, event_types: list[str],
                    description: str | None) -> Created:
    """Subscribe `url` to the owner's job events (raises RefusedUrl for a destination it may not be)."""
    url = check_webhook_url(url, settings.webhook_allowlist)
    secret, blob = secret_list.new_list(settings.secret_key.get_secret_value())
    ep = WebhookEndpoint(id=uuid.uuid4(), owner=owner, url=url, event_types=list(dict.fromkeys(event_types)),
                         description=description, created_at=utcnow(), secrets_encrypted=blob)
    session.add(ep)
    session.commit()
    return Created(ep, secret)


def list_endpoints(session: Session, owner: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.owner == owner)
                                .order_by(WebhookEndpoint.created_at)))


def own_endpoint(session: Session, owner: str, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
    ep = session.get(WebhookEndpoint, endpoint_id)
    return ep if ep is not None and ep.owner == owner else None


def delete_endpoint(session: Session, ep: WebhookEndpoint) -> None:
    session.delete(ep)
    session.commit()


def rotate_secret(session: Session, settings: Settings, ep: WebhookEndpoint) -> secret_list.Rotated:
    """A new secret; the previous ones keep signing for secret_list.ROTATION_GRACE."""
    rotated = secret_list.rotate(ep.secrets_encrypted, settings.secret_key.get_secret_value())
    ep.secrets_encrypted = rotated.blob
    session.commit()
    return rotated


@dataclass(frozen=True)
class DeliveryLog:
    delivery: WebhookDelivery
    attempts: list[DeliveryAttempt]


def _with_attempts(session: Session, d: WebhookDelivery) -> DeliveryLog:
    attempts = session.scalars(
        select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == d.id).order_by(DeliveryAttempt.id)).all()
    return DeliveryLog(d, list(attempts))


def job_deliveries(session: Session, job_id: uuid.UUID) -> list[DeliveryLog]:
    """Every delivery of one job, oldest first, each with its attempts (the caller checks the job is the caller's)."""
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at)).all()
    return [_with_attempts(session, d) for d in rows]


def redeliver(session: Session, settings: Settings, job_id: uuid.UUID, delivery_id: uuid.UUID) -> DeliveryLog | None:
    """Send one of the job's deliveries again (same webhook-id, so receivers can de-duplicate); None if the
    job has no such delivery."""
    d = session.get(WebhookDelivery, delivery_id)
    if d is None or d.job_id != job_id:
        return None
    outbox.reset_for_redelivery(d)
    session.commit()
    send_delivery(settings, d.id)
    return _with_attempts(session, d)
