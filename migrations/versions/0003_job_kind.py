"""Job kinds: a `kind` column ("quantize", the default for every existing row, or "finetune").

Revision ID: 0003_job_kind
Revises: 0002_delivery
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_job_kind"
down_revision = "0002_delivery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="quantize"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("kind")
