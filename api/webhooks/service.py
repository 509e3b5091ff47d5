"""Reading webhook deliveries: one function for the API and the dashboard."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from qaas.api.webhooks.schemas import DeliveryAttemptOut, DeliveryOut
from qaas.db.models import DeliveryAttempt, WebhookDelivery


def delivery_out(session: Session, d: WebhookDelivery) -> DeliveryOut:
    attempts = session.scalars(
        select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == d.id).order_by(DeliveryAttempt.id)
    ).all()
    return DeliveryOut(
        id=d.id, webhook_id=d.msg_id, endpoint_id=d.endpoint_id, url=d.url, event_type=d.event_type, status=d.status,
        attempts=d.attempts, next_attempt_at=d.next_attempt_at, last_status_code=d.last_status_code,
        last_error=d.last_error, created_at=d.created_at, delivered_at=d.delivered_at,
        attempt_log=[DeliveryAttemptOut(attempted_at=a.attempted_at, outcome=a.outcome, status_code=a.status_code,
                                        duration_ms=a.duration_ms, error=a.error) for a in attempts])


def job_deliveries(session: Session, job_id: uuid.UUID) -> list[DeliveryOut]:
    """Every delivery of one job, oldest first, each with its attempt log (the caller checks ownership)."""
    rows = session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at)
    ).all()
    return [delivery_out(session, d) for d in rows]
