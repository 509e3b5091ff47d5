"""Delivery of results: saved Hub credentials, webhook endpoints, the delivery outbox and its attempts.

Revision ID: 0002_delivery
Revises: 0001_initial
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002_delivery"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_secret_encrypted", sa.LargeBinary()))
        batch.add_column(sa.Column("publish_attempts", sa.Integer(), nullable=False, server_default="0"))

    op.create_table(
        "hub_credentials",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("token_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("description", sa.String(255)),
        sa.Column("event_types", JSON, nullable=False),
        sa.Column("secrets_encrypted", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("disabled_at", TS),
        sa.Column("disabled_reason", sa.String(255)),
        sa.Column("flagged_at", TS),
    )
    op.create_index("ix_webhook_endpoints_owner", "webhook_endpoints", ["owner"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), sa.ForeignKey("webhook_endpoints.id", ondelete="SET NULL")),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("msg_id", sa.String(64), nullable=False, unique=True),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS),
        sa.Column("locked_until", TS),
        sa.Column("dispatched_at", TS),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_error", sa.String(500)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS),
    )
    op.create_index("ix_webhook_deliveries_job_id", "webhook_deliveries", ["job_id"])
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])
    op.create_table(
        "webhook_delivery_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.Uuid(), sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempted_at", TS, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("duration_ms", sa.Integer()),
        sa.Column("error", sa.String(500)),
        sa.Column("response_excerpt", sa.String(500)),
    )
    op.create_index("ix_webhook_delivery_attempts_delivery", "webhook_delivery_attempts", ["delivery_id", "id"])


def downgrade() -> None:
    op.drop_table("webhook_delivery_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_table("hub_credentials")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("publish_attempts")
        batch.drop_column("webhook_secret_encrypted")
