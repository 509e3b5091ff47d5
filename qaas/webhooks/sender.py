"""Sending webhook deliveries from the outbox, one attempt at a time (the I/O queue).

The database drives retries: each attempt is recorded, and the delivery's next_attempt_at is set
from the backoff schedule (honouring Retry-After); the sweeper sends whatever is due. A delivery is
locked for the length of one attempt so two senders never send it at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from sqlalchemy import update

from qaas.db.models import DeliveryAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.db.retry import with_db_retry
from qaas.settings import Settings
from qaas.webhooks import delivery
from qaas.webhooks import outbox
from qaas.webhooks.secret_list import secrets_for

log = logging.getLogger("qaas.webhooks")


def deliver(settings: Settings, delivery_id: uuid.UUID) -> str | None:
    """Make one attempt of a due delivery; returns its outcome, or None if it was not ours to send."""
    db = settings.database
    key = settings.secret_key.get_secret_value()

    def take(session):
        d = outbox.lock_for_attempt(session, delivery_id)
        if d is None:
            return None
        if d.endpoint_id is not None:
            ep = session.get(WebhookEndpoint, d.endpoint_id)
            if ep is None or ep.disabled_at is not None:
                d.status, d.last_error, d.locked_until = "disabled", "the endpoint was deleted or disabled", None
                return None
        return {"url": d.url, "msg_id": d.msg_id, "event_type": d.event_type, "payload": d.payload,
                "attempt": d.attempts + 1, "created_at": d.created_at, "secrets": secrets_for(session, d, key),
                "endpoint_id": d.endpoint_id}

    todo = with_db_retry(db, take)
    if todo is None:
        return None
    if not todo["secrets"]:
        result = None
        outcome, error = delivery.FAILED, "no signing secret is available for this delivery"
    else:
        result = delivery.deliver_once(
            todo["url"], todo["secrets"], todo["msg_id"], todo["event_type"], todo["payload"],
            allowlist=settings.webhook_allowlist, attempt=todo["attempt"], event_time=todo["created_at"],
            timeout=settings.webhook_timeout_s,
            **({"schedule": settings.webhook_schedule} if settings.webhook_schedule else {}),
        )
        outcome, error = result.outcome, result.error

    def record(session):
        d = session.get(WebhookDelivery, delivery_id)
        now = utcnow()
        session.add(DeliveryAttempt(delivery_id=delivery_id, attempted_at=now, outcome=outcome,
                                    status_code=result.status_code if result else None,
                                    duration_ms=result.duration_ms if result else 0,
                                    error=(error or None) and error[:500],
                                    response_excerpt=(result.response_excerpt[:500] if result else None)))
        d.attempts = todo["attempt"]
        d.locked_until = None
        d.dispatched_at = None  # the next attempt, if any, gets its own message
        d.last_status_code = result.status_code if result else None
        d.last_error = (error or None) and error[:500]
        ep_id = todo["endpoint_id"]
        if outcome == delivery.SUCCESS:
            d.status, d.delivered_at, d.next_attempt_at = "delivered", now, None
            if ep_id is not None:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id).values(flagged_at=None))
        elif outcome == delivery.RETRY:
            d.next_attempt_at = now + dt.timedelta(seconds=result.next_retry_s or 5.0)
        elif outcome == delivery.GONE:
            d.status, d.next_attempt_at = "disabled", None
            if ep_id is not None:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id)
                                .values(disabled_at=now, disabled_reason="the receiver answered 410 Gone"))
        else:  # FAILED or EXHAUSTED
            d.status, d.next_attempt_at = "failed", None
            if ep_id is not None and outcome == delivery.EXHAUSTED:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id).values(flagged_at=now))

    with_db_retry(db, record)
    log.info("delivery %s attempt %d: %s", delivery_id, todo["attempt"], outcome)
    return outcome
