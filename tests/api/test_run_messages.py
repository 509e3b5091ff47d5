"""The dispatcher's batch of "run job X" messages (`qaas.queue.send_run_jobs`) on real Redis: one pipeline for
the batch, each message in the queue of its job's GPU count and the list of its priority, readable by kombu
(the worker's side) as the task with the job's id."""

from __future__ import annotations

import uuid

from conftest import make_settings

from qaas.queue import RUN_JOB_TASK, broker_priority, celery_app, gpu_queue_name, send_run_jobs


def _drain(settings, queue: str) -> list[tuple[str, int]]:
    """(job id, broker priority) of every message in the queue, as a consumer gets them (highest first)."""
    got = []
    with celery_app(settings).connection_for_read() as conn:
        q = conn.SimpleQueue(queue, no_ack=True)
        try:
            while True:
                m = q.get(timeout=0.5)
                assert m.headers["task"] == RUN_JOB_TASK
                got.append((m.payload[0][0], m.properties["priority"]))
        except q.Empty:
            pass
        finally:
            q.close()
    return got


def test_a_batch_goes_out_as_one_pipeline_into_each_jobs_queue_and_priority(tmp_path, redis_db):
    settings = make_settings(tmp_path, broker_url=redis_db, max_gpus_per_job=2)
    with celery_app(settings).producer_or_acquire() as producer:
        # the service's transport options must leave kombu able to batch (a retrying client turns it off)
        assert producer.supports_batch_publish
    jobs = [(uuid.uuid4(), p, 1 + (i % 2)) for i, p in enumerate([0, 9, 5, 5, 3, 0, 7])]
    assert send_run_jobs(settings, jobs) == len(jobs)
    for gpus in (1, 2):
        mine = [(str(j), broker_priority(p)) for j, p, g in jobs if g == gpus]
        got = _drain(settings, gpu_queue_name(settings, gpus))
        # every job once; a higher job priority (lower broker priority) comes first, same priority in order
        assert got == sorted(mine, key=lambda m: m[1])


def test_an_unreachable_broker_counts_nothing_as_sent(tmp_path):
    down = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    assert send_run_jobs(down, [(uuid.uuid4(), 0, 1), (uuid.uuid4(), 3, 1)]) == 0
