"""The tables. The job row is the truth about a job; broker messages only say "look at job X".

Every schema change goes through an Alembic migration in `migrations/versions/`.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# JSONB on PostgreSQL, plain JSON (text) on SQLite.
JsonType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use qaas.db.models.utcnow()")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    pass


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


TERMINAL_STATUSES = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    #: The tenant: every key of one owner sees the same jobs, and no other.
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128))
    #: The first characters of the key, to tell keys apart in listings; not enough to use it.
    prefix: Mapped[str] = mapped_column(String(16))
    #: HMAC-SHA256 of the key under the server secret; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner", "created_at", "id"),
        Index("ix_jobs_status_priority", "status", "priority", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    priority: Mapped[int] = mapped_column(Integer, default=0)

    #: The validated request, secrets removed (the recipe as submitted).
    request: Mapped[dict[str, Any]] = mapped_column(JsonType)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: "quantize" or "finetune" (QLoRA adapters on a 4-bit base); the request's shape depends on it.
    kind: Mapped[str] = mapped_column(String(16), default="quantize", server_default="quantize")
    method: Mapped[str] = mapped_column(String(32))
    bits: Mapped[int | None] = mapped_column(Integer)

    source_model: Mapped[str] = mapped_column(String(512))
    source_revision: Mapped[str | None] = mapped_column(String(128))

    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(String(512))
    #: Seconds spent in each finished stage of the last attempt, e.g. {"load": 1.2, "quantize": 40.0}.
    timings: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(255))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    #: When the last broker message for this job was sent; NULL means "never sent" (broker down).
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    #: {"code", "message", "stage", "field"} when the job failed.
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    #: The engine's result (files, sizes, evaluation, timings) when the job succeeded.
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)

    #: The caller's Hub token for this job, encrypted (Fernet under the server secret); wiped at the end.
    hf_token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: The secret of the request's own webhook, encrypted (shown to the caller once, at submission).
    webhook_secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    #: Publishing to the Hub runs after the GPU part, on the I/O queue: attempts made so far.
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    """The append-only timeline of a job. Rows are never updated or deleted while the job lives."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: status | stage | progress | log | error | result
    kind: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)


class HubCredential(Base):
    """A tenant's saved Hub token, encrypted; used when a job brings no `hf_token` of its own."""

    __tablename__ = "hub_credentials"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookEndpoint(Base):
    """An account-level webhook: every job of the owner notifies it of the subscribed event types."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(255))
    event_types: Mapped[list[str]] = mapped_column(JsonType)
    #: Fernet-encrypted JSON list of {"secret", "expires_at"}: the newest first; rotation keeps the
    #: previous secret valid for a while, and deliveries carry one signature per valid secret.
    secrets_encrypted: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(String(255))
    #: Set when a delivery to this endpoint ran out of retries; cleared by the next success.
    flagged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """The outbox: one row per (job event, destination), written in the job's final transaction."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    endpoint_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("webhook_endpoints.id", ondelete="SET NULL"))
    owner: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    #: The Standard Webhooks `webhook-id`: the same on every retry of this delivery.
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    #: pending | delivered | failed | disabled
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    #: When a message asking for the next attempt was last sent (so the sweeper sends one per attempt).
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class DeliveryAttempt(Base):
    """Every attempt of a delivery, kept for the user to inspect."""

    __tablename__ = "webhook_delivery_attempts"
    __table_args__ = (Index("ix_webhook_delivery_attempts_delivery", "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    response_excerpt: Mapped[str | None] = mapped_column(String(500))
