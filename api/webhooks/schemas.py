"""Shapes of the webhook and delivery routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, Field

from qaas.db.models import WebhookEndpoint
from qaas.schemas.base import RequestModel
from qaas.webhooks.outbox import DEFAULT_EVENT_TYPES, EVENT_TYPES
from qaas.webhooks.service import DeliveryLog

EventType = Literal[EVENT_TYPES]


class WebhookEndpointIn(RequestModel):
    url: AnyHttpUrl
    event_types: list[EventType] = Field(default_factory=lambda: list(DEFAULT_EVENT_TYPES),
                                         min_length=1, description="job.started and job.progress are opt-in")
    description: str | None = Field(default=None, max_length=255)


class WebhookEndpointOut(BaseModel):
    id: uuid.UUID
    url: str
    event_types: list[str]
    description: str | None
    created_at: dt.datetime
    disabled_at: dt.datetime | None
    disabled_reason: str | None
    flagged_at: dt.datetime | None = Field(description="set when deliveries ran out of retries")

    @classmethod
    def of(cls, ep: WebhookEndpoint, **extra):
        return cls(id=ep.id, url=ep.url, event_types=ep.event_types, description=ep.description,
                   created_at=ep.created_at, disabled_at=ep.disabled_at, disabled_reason=ep.disabled_reason,
                   flagged_at=ep.flagged_at, **extra)


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(description="whsec_...; shown once: store it to verify signatures")


class SecretRotated(BaseModel):
    secret: str = Field(description="the new whsec_... secret, shown once")
    previous_secret_expires_at: dt.datetime = Field(description="until then deliveries carry both signatures")


class DeliveryAttemptOut(BaseModel):
    attempted_at: dt.datetime
    outcome: str
    status_code: int | None
    duration_ms: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: uuid.UUID
    webhook_id: str = Field(description="the webhook-id header, the same on every retry")
    endpoint_id: uuid.UUID | None = Field(description="null for the request's own webhook")
    url: str
    event_type: str
    status: str = Field(description="pending | delivered | failed | disabled")
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    attempt_log: list[DeliveryAttemptOut]

    @classmethod
    def of(cls, log: DeliveryLog) -> "DeliveryOut":
        d = log.delivery
        return cls(
            id=d.id, webhook_id=d.msg_id, endpoint_id=d.endpoint_id, url=d.url, event_type=d.event_type,
            status=d.status, attempts=d.attempts, next_attempt_at=d.next_attempt_at,
            last_status_code=d.last_status_code, last_error=d.last_error, created_at=d.created_at,
            delivered_at=d.delivered_at,
            attempt_log=[DeliveryAttemptOut(attempted_at=a.attempted_at, outcome=a.outcome, status_code=a.status_code,
                                            duration_ms=a.duration_ms, error=a.error) for a in log.attempts])
