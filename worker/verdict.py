"""Writing a job's verdict and announcing it: the one path every worker-side ending takes.

The fenced `job_store.finish` writes the final state and its webhook outbox rows in one transaction;
right after it commits, the new deliveries are handed to the I/O queue (the sweeper would send them
anyway, a sweep later).
"""

from __future__ import annotations

import uuid
from typing import Any

from qaas import job_store
from qaas.db.models import JobStatus
from qaas.db.retry import with_db_retry
from qaas.settings import Settings
from qaas.webhooks import outbox


def finish_job(settings: Settings, job_id: uuid.UUID, attempt: int, status: JobStatus, **fields: Any) -> bool:
    """Finish the attempt (see job_store.finish for `fields`); False if the attempt is no longer ours."""
    ok = with_db_retry(settings.database,
                       lambda s: job_store.finish(s, job_id, attempt, status, **fields))
    if ok:
        outbox.send_job_deliveries(settings, job_id)
    return ok
