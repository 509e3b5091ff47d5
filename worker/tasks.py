"""Celery tasks. A message carries only a job id; everything else is read from the database."""

from __future__ import annotations

import logging
import uuid

from celery.signals import worker_ready, worker_shutdown

from qaas.queue import RUN_JOB_TASK, celery_app
from qaas.settings import get_settings
from qaas.worker.attempt import run_attempt
from qaas.worker.sweeper import Sweeper

log = logging.getLogger("qaas.worker")
settings = get_settings()
app = celery_app(settings)
_sweeper: Sweeper | None = None


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        log.warning("ignoring a message with a bad job id")
        return "bad-id"
    return run_attempt(settings, jid)


@worker_ready.connect
def _start_sweeper(**_kwargs) -> None:
    global _sweeper
    _sweeper = Sweeper(settings)
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    if _sweeper is not None:
        _sweeper.stop()
