"""Shapes of the webhook, delivery and Hub-credential routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, Field, SecretStr, field_validator

from qaas.schemas.base import RequestModel

EventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.started", "job.progress"]


class WebhookEndpointIn(RequestModel):
    url: AnyHttpUrl
    event_types: list[EventType] = Field(default_factory=lambda: ["job.succeeded", "job.failed", "job.cancelled"],
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


class HubTokenIn(RequestModel):
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw or len(raw) > 512 or any(c.isspace() for c in raw):
            raise ValueError("not a valid token")
        return v


class HubTokenStatus(BaseModel):
    configured: bool
    updated_at: dt.datetime | None
