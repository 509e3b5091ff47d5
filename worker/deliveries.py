"""Sending webhook deliveries from the outbox, one attempt at a time (the I/O queue).

The database drives retries: each attempt is recorded, and the delivery's next_attempt_at is set
from the backoff schedule (honouring Retry-After); the sweeper sends whatever is due. A delivery is
locked for the length of one attempt so two senders never send it at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid

from sqlalchemy import update

from qaas import outbox
from qaas.db.models import DeliveryAttempt, Job, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.db.retry import with_db_retry
from qaas.kit import webhook_delivery
from qaas.security import decrypt_secret
from qaas.settings import Settings

log = logging.getLogger("qaas.webhooks")


def endpoint_secrets(settings: Settings, ep: WebhookEndpoint) -> list[str]:
    """The endpoint's valid secrets, newest first (two during a rotation's grace period)."""
    entries = json.loads(decrypt_secret(ep.secrets_encrypted, settings.secret_key.get_secret_value()))
    now = utcnow().timestamp()
    return [e["secret"] for e in entries if not e.get("expires_at") or e["expires_at"] > now]


def _secrets_for(settings: Settings, session, delivery: WebhookDelivery) -> list[str]:
    if delivery.endpoint_id is not None:
        ep = session.get(WebhookEndpoint, delivery.endpoint_id)
        return endpoint_secrets(settings, ep) if ep is not None else []
    job = session.get(Job, delivery.job_id)
    if job is None or job.webhook_secret_encrypted is None:
        return []
    return [decrypt_secret(job.webhook_secret_encrypted, settings.secret_key.get_secret_value())]


def deliver(settings: Settings, delivery_id: uuid.UUID) -> str | None:
    """Make one attempt of a due delivery; returns its outcome, or None if it was not ours to send."""
    db = settings.resolved_database_url

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
                "attempt": d.attempts + 1, "created_at": d.created_at, "secrets": _secrets_for(settings, session, d),
                "endpoint_id": d.endpoint_id}

    todo = with_db_retry(db, take)
    if todo is None:
        return None
    if not todo["secrets"]:
        result = None
        outcome, error = webhook_delivery.FAILED, "no signing secret is available for this delivery"
    else:
        result = webhook_delivery.deliver_once(
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
        if outcome == webhook_delivery.SUCCESS:
            d.status, d.delivered_at, d.next_attempt_at = "delivered", now, None
            if ep_id is not None:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id).values(flagged_at=None))
        elif outcome == webhook_delivery.RETRY:
            d.next_attempt_at = now + dt.timedelta(seconds=result.next_retry_s or 5.0)
        elif outcome == webhook_delivery.GONE:
            d.status, d.next_attempt_at = "disabled", None
            if ep_id is not None:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id)
                                .values(disabled_at=now, disabled_reason="the receiver answered 410 Gone"))
        else:  # FAILED or EXHAUSTED
            d.status, d.next_attempt_at = "failed", None
            if ep_id is not None and outcome == webhook_delivery.EXHAUSTED:
                session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == ep_id).values(flagged_at=now))

    with_db_retry(db, record)
    log.info("delivery %s attempt %d: %s", delivery_id, todo["attempt"], outcome)
    return outcome
