"""The sweeper: makes the database's view of the queue come true.

- queued jobs never sent to the broker (it was down at submission) or sent long ago and never
  claimed (the message was lost, e.g. Redis restarted) are sent again;
- running jobs whose worker stopped heartbeating are queued again while attempts remain, else failed;
- jobs waiting to be published that nobody holds are sent to the I/O queue again;
- webhook deliveries that are due (first attempt or a retry) are sent to the I/O queue.

Duplicate messages are harmless: the claim is atomic. Several sweepers may run at once.
"""

from __future__ import annotations

import logging
import threading

from qaas import job_store
from qaas.db.models import JobStatus
from qaas.db.session import session_scope
from qaas.queue import gpu_queue_depth, send_delivery, send_publish, send_run_job
from qaas.settings import Settings
from qaas.webhooks import outbox

log = logging.getLogger("qaas.sweeper")


def sweep_once(settings: Settings) -> dict[str, int]:
    db = settings.database
    counts = {"dispatched": 0, "requeued": 0, "failed": 0, "publishes": 0, "deliveries": 0}
    with session_scope(db) as s:
        expired = [(j, a) for j, a, stage in job_store.expired_leases(s) if stage != job_store.PUBLISH_STAGE]
        publishes = job_store.stale_publishes(s, redispatch_after_s=settings.redispatch_after_s)
        deliveries = outbox.claim_due_deliveries(s)
    for job_id in publishes:
        # a lost upload worker or message: the publish (not the quantization) runs again
        with session_scope(db) as s:
            job_store.mark_publish_dispatched(s, job_id)
        if send_publish(settings, job_id):
            counts["publishes"] += 1
    for delivery_id in deliveries:
        if send_delivery(settings, delivery_id):  # a lost message is sent again after REDISPATCH_S
            counts["deliveries"] += 1
    for job_id, attempt in expired:
        reason = "the worker stopped heartbeating (lease expired)"
        with session_scope(db) as s:
            if job_store.requeue_for_retry(s, job_id, attempt, reason):
                counts["requeued"] += 1
                continue
            if job_store.finish(s, job_id, attempt, JobStatus.failed,
                                error={"code": "worker_lost", "message": reason + "; no attempts left", "stage": None}):
                counts["failed"] += 1
    # A queued job whose message went out long ago may simply be waiting behind others. Each dispatched
    # queued job should have one message in the broker; only when the broker holds fewer messages than
    # that were some lost (Redis restarted) -- then re-send that many stale ones, oldest first. Re-sending
    # every stale job each REDISPATCH_AFTER_S made a deep queue balloon with duplicates.
    depth = gpu_queue_depth(settings)
    with session_scope(db) as s:
        missing = None if depth is None else max(0, job_store.dispatched_queued_count(s) - depth)
        pending = job_store.jobs_to_dispatch(s, redispatch_after_s=settings.redispatch_after_s,
                                             include_stale=missing is None or missing > 0, stale_limit=missing)
    for job_id, priority, gpus in pending:
        if not send_run_job(settings, job_id, priority=priority, gpus=gpus):
            break  # broker still down; try again next sweep
        with session_scope(db) as s:
            job_store.mark_dispatched(s, job_id)
        counts["dispatched"] += 1
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


class Sweeper(threading.Thread):
    def __init__(self, settings: Settings) -> None:
        super().__init__(name="qaas-sweeper", daemon=True)
        self.settings = settings
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.settings.sweep_interval_s):
            try:
                sweep_once(self.settings)
            except Exception as exc:  # the database or broker is down: try again next time
                log.warning("sweep failed: %s", exc.__class__.__name__)

    def stop(self) -> None:
        self.stop_event.set()
