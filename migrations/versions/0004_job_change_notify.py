"""Job changes announced with NOTIFY: each API process caches job documents and drops them when told.

Every UPDATE of a column a job document is made of, and every DELETE, sends `pg_notify('qaas_job_changed',
'<job id>:<owner>')` at commit, whichever process or tool made it; a TRUNCATE sends '*' (forget all).
Updates that touch only bookkeeping no document shows (`dispatched_at`, leases, heartbeats, the
encrypted secrets) send nothing: the submission path's dispatched mark stays a plain UPDATE. A new row
needs no message: nothing can be cached for a job that did not exist. PostgreSQL only (embedded SQLite
has no cache to keep fresh).

The columns are those of `qaas.job_store.JOB_COLUMNS` at this revision (a later column a document
shows needs a migration that redefines the trigger; `tests/api/test_document_cache.py` checks the
trigger in the database against JOB_COLUMNS).

Revision ID: 0004_job_change_notify
Revises: 0003_job_kind
Create Date: 2026-12-03
"""

from alembic import op

revision = "0004_job_change_notify"
down_revision = "0003_job_kind"
branch_labels = None
depends_on = None

CHANNEL = "qaas_job_changed"
DOCUMENT_COLUMNS = ("id", "status", "stage", "progress", "progress_message", "kind", "method", "bits",
                    "source_model", "source_revision", "priority", "attempt", "max_attempts", "worker",
                    "cancel_requested", "created_at", "started_at", "finished_at", "updated_at", "timings", "error",
                    "result", "request")


def _row(alias: str) -> str:
    return "(" + ", ".join(f"{alias}.{c}" for c in DOCUMENT_COLUMNS) + ")"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE FUNCTION qaas_notify_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- OLD: the owner the cached document was stored under (an owner never changes, but if it did
            -- the old owner's document is the one to drop)
            PERFORM pg_notify('{CHANNEL}', OLD.id::text || ':' || OLD.owner);
            RETURN NULL;
        END $$""")
    op.execute(f"""
        CREATE FUNCTION qaas_notify_jobs_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '*');
            RETURN NULL;
        END $$""")
    op.execute(f"CREATE TRIGGER jobs_document_changed AFTER UPDATE ON jobs FOR EACH ROW"
               f" WHEN ({_row('OLD')} IS DISTINCT FROM {_row('NEW')})"
               f" EXECUTE FUNCTION qaas_notify_job_changed()")
    op.execute("CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION qaas_notify_job_changed()")
    op.execute("CREATE TRIGGER jobs_truncated AFTER TRUNCATE ON jobs FOR EACH STATEMENT"
               " EXECUTE FUNCTION qaas_notify_jobs_truncated()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for trigger in ("jobs_document_changed", "jobs_deleted", "jobs_truncated"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON jobs")
    op.execute("DROP FUNCTION IF EXISTS qaas_notify_job_changed()")
    op.execute("DROP FUNCTION IF EXISTS qaas_notify_jobs_truncated()")
