"""Celery tasks. A message carries only an id; everything else is read from the database."""

from __future__ import annotations

import logging
import uuid

from celery.signals import worker_ready, worker_shutdown

from qaas.queue import DELIVER_TASK, PUBLISH_TASK, RUN_JOB_TASK, celery_app
from qaas.settings import get_settings
from qaas.worker.attempt import run_attempt, worker_name
from qaas.worker.sweeper import Sweeper

log = logging.getLogger("qaas.worker")
settings = get_settings()
app = celery_app(settings)
_sweeper: Sweeper | None = None


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        log.warning("ignoring a message with a bad id")
        return None


@app.task(name=RUN_JOB_TASK, ignore_result=True)
def run_job(job_id: str) -> str:
    jid = _uuid(job_id)
    return run_attempt(settings, jid) if jid else "bad-id"


@app.task(name=PUBLISH_TASK, ignore_result=True)
def publish_job(job_id: str) -> str:
    from qaas.worker.publishing import run_publish

    jid = _uuid(job_id)
    return run_publish(settings, jid, worker=worker_name()) if jid else "bad-id"


@app.task(name=DELIVER_TASK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    from qaas.webhooks.sender import deliver

    did = _uuid(delivery_id)
    return (deliver(settings, did) or "not-due") if did else "bad-id"


@worker_ready.connect
def _start_sweeper(**_kwargs) -> None:
    global _sweeper
    _sweeper = Sweeper(settings)
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    if _sweeper is not None:
        _sweeper.stop()
