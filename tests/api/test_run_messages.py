"""The dispatcher's batch of "run job X" messages on real Redis (`qaas.queue.send_run_jobs` through Celery and
kombu; `qaas.queue.RunMessages`, the API's direct writer): one pipeline for the batch, each message in the
queue of its job's GPU count and the list of its priority, readable by kombu (the worker's side) as the task
with the job's id -- and the direct writer's messages are Celery's own, field by field."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import redis
from conftest import make_settings

from qaas.queue import RUN_JOB_TASK, RunMessages, broker_priority, celery_app, gpu_queue_name, send_run_jobs

MIXED = [0, 9, 5, 5, 3, 0, 7]


def _send_direct(settings, jobs) -> int:
    async def go():
        messages = RunMessages(settings)
        try:
            return await messages.send(jobs)
        finally:
            await messages.close()

    return asyncio.run(go())


def _raw(url: str) -> dict[bytes, list[dict]]:
    """Every message list in Redis, its documents oldest first, with the per-message ids named by role."""
    r = redis.Redis.from_url(url)
    out = {}
    for key in r.keys():
        if r.type(key) != b"list":
            continue
        docs = []
        for raw in reversed(r.lrange(key, 0, -1)):  # LPUSH: the oldest is last
            doc = json.loads(raw)
            task_id = doc["headers"]["id"]
            assert doc["headers"]["root_id"] == doc["properties"]["correlation_id"] == task_id
            for where, field in ((doc["headers"], "id"), (doc["headers"], "root_id"),
                                 (doc["properties"], "correlation_id"), (doc["properties"], "delivery_tag")):
                uuid.UUID(where[field])
                where[field] = "<uuid>"
            doc["body"] = json.loads(base64.b64decode(doc["body"]))
            docs.append(doc)
        out[key] = docs
    r.flushdb()
    return out


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
    jobs = [(uuid.uuid4(), p, 1 + (i % 2)) for i, p in enumerate(MIXED)]
    assert send_run_jobs(settings, jobs) == len(jobs)
    _check_readable(settings, jobs)


def test_the_direct_writer_goes_into_each_jobs_queue_and_priority(tmp_path, redis_db):
    settings = make_settings(tmp_path, broker_url=redis_db, max_gpus_per_job=2)
    jobs = [(uuid.uuid4(), p, 1 + (i % 2)) for i, p in enumerate(MIXED)]
    assert _send_direct(settings, jobs) == len(jobs)
    _check_readable(settings, jobs)


def test_the_direct_writers_messages_are_celerys_own(tmp_path, redis_db):
    settings = make_settings(tmp_path, broker_url=redis_db, max_gpus_per_job=2)
    jobs = [(uuid.uuid4(), p, 1 + (i % 2)) for i, p in enumerate(MIXED)]
    assert send_run_jobs(settings, jobs) == len(jobs)
    by_celery = _raw(redis_db)
    assert _send_direct(settings, jobs) == len(jobs)
    direct = _raw(redis_db)
    assert sorted(direct) == sorted(by_celery) and len(by_celery) > 2
    for key in by_celery:
        assert direct[key] == by_celery[key], key


def _check_readable(settings, jobs) -> None:
    for gpus in (1, 2):
        mine = [(str(j), broker_priority(p)) for j, p, g in jobs if g == gpus]
        got = _drain(settings, gpu_queue_name(settings, gpus))
        # every job once; a higher job priority (lower broker priority) comes first, same priority in order
        assert got == sorted(mine, key=lambda m: m[1])


def test_an_unreachable_broker_counts_nothing_as_sent(tmp_path):
    down = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    assert send_run_jobs(down, [(uuid.uuid4(), 0, 1), (uuid.uuid4(), 3, 1)]) == 0
    assert _send_direct(down, [(uuid.uuid4(), 0, 1), (uuid.uuid4(), 3, 1)]) == 0
