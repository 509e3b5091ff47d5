"""The broker side of the job queue: the Celery app and sending "look at job X" messages.

A message carries only the job id; the database row is the truth. Sending is best effort: if the
broker is down the job stays queued with `dispatched_at` NULL and the sweeper sends it later.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from functools import lru_cache
from pathlib import Path

from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError

from qaas.settings import Settings

log = logging.getLogger("qaas.queue")

RUN_JOB_TASK = "qaas.run_job"
PUBLISH_TASK = "qaas.publish_job"
DELIVER_TASK = "qaas.deliver_webhook"


def gpu_queue_name(settings: Settings, gpus: int) -> str:
    """The queue of the jobs that run on `gpus` GPUs of one host: QAAS_GPU_QUEUE for one GPU, "<it>-x<N>" for
    N. A worker consumes the queue of its own GPU count (QAAS_WORKER_GPUS), so the N GPUs it holds are
    claimed by one N-GPU job at a time, never shared with a one-GPU job."""
    return settings.gpu_queue if gpus <= 1 else f"{settings.gpu_queue}-x{gpus}"


def gpu_queue_names(settings: Settings) -> list[str]:
    """Every GPU queue this service may send to (one per GPU count up to the largest a job may ask or a
    worker holds)."""
    return [gpu_queue_name(settings, n) for n in range(1, max(settings.max_gpus_per_job, settings.worker_gpus) + 1)]


@lru_cache(maxsize=4)
def _celery_app_for(broker_url: str, broker_folder: str, gpu_queues: tuple[str, ...], io_queue: str) -> Celery:
    gpu_queue = gpu_queues[0]
    app = Celery("qaas", broker=broker_url, set_as_current=False)
    transport_options: dict = {}
    if broker_url.startswith("filesystem"):
        # Embedded mode: kombu's filesystem transport needs no server; in and out share one folder.
        # (made once per process: this function is cached)
        Path(broker_folder).mkdir(parents=True, exist_ok=True)
        for suffix in ("-processed", "-control"):
            Path(broker_folder + suffix).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": broker_folder,
            "data_folder_out": broker_folder,
            "processed_folder": broker_folder + "-processed",
            "store_processed": False,
            # its exchange tables; kombu's default is ./control, a folder in whatever the cwd is
            "control_folder": broker_folder + "-control",
        }
    else:
        # Fail fast when Redis is down: the job is already committed and the sweeper retries.
        transport_options = {"socket_connect_timeout": 2, "socket_timeout": 5, "max_retries": 1,
                             # one list per priority level (kombu's default lumps them into 4 steps)
                             "priority_steps": list(range(10))}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=gpu_queue,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (*gpu_queues, io_queue)],
        task_routes={
            RUN_JOB_TASK: {"queue": gpu_queue, "routing_key": gpu_queue},
            # network-bound work never waits behind (or holds) a GPU
            PUBLISH_TASK: {"queue": io_queue, "routing_key": io_queue},
            DELIVER_TASK: {"queue": io_queue, "routing_key": io_queue},
        },
        # One job per worker (its GPU, or its GPUs): a worker takes one message at a time.
        worker_prefetch_multiplier=1,
        task_acks_late=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def celery_app(settings: Settings) -> Celery:
    return _celery_app_for(settings.resolved_broker_url, str(settings.broker_folder), tuple(gpu_queue_names(settings)),
                           settings.io_queue)


def broker_priority(job_priority: int) -> int:
    """A job's priority (0..9, higher runs first) as the broker's: kombu's Redis transport serves
    priority 0 first (BRPOP over the per-priority lists in ascending order), so the scale is reversed."""
    return 9 - max(0, min(9, job_priority))


def send_run_job(settings: Settings, job_id: uuid.UUID, *, priority: int = 0, gpus: int = 1) -> bool:
    """Publish the message to the queue of the job's GPU count; False (logged) if the broker cannot be
    reached right now."""
    app = celery_app(settings)
    try:
        app.send_task(
            RUN_JOB_TASK,
            args=[str(job_id)],
            queue=gpu_queue_name(settings, gpus),
            retry=False,
            priority=broker_priority(priority),
        )
        return True
    except Exception as exc:  # broker down or unreachable: the sweeper will send it later
        log.warning("could not enqueue job %s: %s", job_id, exc.__class__.__name__)
        return False


def send_run_jobs(settings: Settings, jobs: list[tuple[uuid.UUID, int, int]]) -> int:
    """Publish a batch of (job id, priority, GPUs) messages over one pooled connection and producer.

    On Redis the batch goes out as one pipeline (kombu's `Producer.batch`): one round trip for the batch
    instead of one LPUSH round trip per job, which was a quarter of a submission's CPU under load. A
    pipeline that fails may have delivered some of its messages, so then none counts as sent: the sweeper
    sends them again, and a second message for a job is harmless (claiming a job is conditional on its
    row). Transports that cannot batch (embedded mode's filesystem) publish one message at a time, and
    what went out before a failure counts.

    Returns how many went out, counted from the start: after the first failure the rest are left
    (logged) for the sweeper, instead of paying a broker time-out per job."""
    app = celery_app(settings)
    published = 0
    batched = False
    try:
        with app.producer_or_acquire() as producer:
            batched = producer.supports_batch_publish
            with producer.batch():
                for job_id, priority, gpus in jobs:
                    app.send_task(RUN_JOB_TASK, args=[str(job_id)], queue=gpu_queue_name(settings, gpus),
                                  retry=False, priority=broker_priority(priority), producer=producer)
                    published += 1
    except Exception as exc:  # broker down or unreachable: the sweeper will send the rest later
        sent = 0 if batched else published
        log.warning("could not enqueue %d of %d jobs: %s", len(jobs) - sent, len(jobs), exc.__class__.__name__)
        return sent
    return published


# --- "run job X" written straight to Redis, for the API's dispatcher ----------------------------------
# Celery's send_task and kombu's publish cost about 0.5 ms of CPU per message (routing, entity copies and
# declarations, settings lookups, two uuid4s), a fifth of a submission. On Redis a message is one LPUSH of
# a JSON document onto the list of its queue and priority; `RunMessages` writes exactly the document
# Celery 5 (task protocol 2) and kombu's Redis transport write for `send_run_jobs` -- pinned field by field
# against it in tests/api/test_run_messages.py -- on the event loop's own Redis connection.

#: kombu's Redis transport: priority p > 0 of a queue is the list "<queue>\x06\x16<p>" (`Channel._q_for_pri`;
#: with priority_steps 0..9 every priority has its own list).
_PRIORITY_SEP = "\x06\x16"
#: The third part of a protocol-2 body: no callbacks, no chain, no chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def redis_queue_key(queue: str, broker_priority_: int) -> str:
    return f"{queue}{_PRIORITY_SEP}{broker_priority_}" if broker_priority_ else queue


class RunMessages:
    """Builds and sends run-job messages for one process and event loop (`origin` names the process, as
    Celery's does; `reply_to` is the app's per-thread id, as Celery's send_task sets it)."""

    def __init__(self, settings: Settings) -> None:
        import redis.asyncio as aioredis
        from celery.utils.nodenames import anon_nodename

        self.settings = settings
        self.origin = anon_nodename()
        self.reply_to = celery_app(settings).thread_oid
        # the transport options the Celery app uses: fail fast when Redis is down (the job is committed;
        # the sweeper sends what did not go out)
        self.client = aioredis.Redis.from_url(settings.resolved_broker_url, socket_connect_timeout=2,
                                              socket_timeout=5)

    def message(self, job_id: uuid.UUID, priority: int, gpus: int) -> tuple[str, bytes]:
        """(Redis list, the message's JSON) of one job, as kombu's Redis transport would LPUSH it."""
        task_id = str(uuid.uuid4())
        args = [str(job_id)]
        queue = gpu_queue_name(self.settings, gpus)
        pri = broker_priority(priority)
        body = base64.b64encode(json.dumps([args, {}, _EMBED]).encode()).decode()
        headers = {"lang": "py", "task": RUN_JOB_TASK, "id": task_id, "shadow": None, "eta": None, "expires": None,
                   "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
                   "parent_id": None, "argsrepr": repr(args), "kwargsrepr": "{}", "origin": self.origin,
                   "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
        properties = {"correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
                      "delivery_info": {"exchange": "", "routing_key": queue}, "priority": pri,
                      "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
        document = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                    "headers": headers, "properties": properties}
        return redis_queue_key(queue, pri), json.dumps(document).encode()

    async def send(self, jobs: list[tuple[uuid.UUID, int, int]]) -> int:
        """`send_run_jobs` on the event loop: the batch as one pipeline; how many went out (all or none: a
        pipeline that failed may have delivered part of the batch, and a second message is harmless)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id, priority, gpus in jobs:
            pipe.lpush(*self.message(job_id, priority, gpus))
        try:
            await pipe.execute()
        except Exception as exc:  # broker down or unreachable: the sweeper will send them later
            log.warning("could not enqueue %d jobs: %s", len(jobs), exc.__class__.__name__)
            return 0
        return len(jobs)

    async def close(self) -> None:
        await self.client.aclose()


def send_delivery(settings: Settings, delivery_id: uuid.UUID) -> bool:
    """Ask an I/O worker to attempt a webhook delivery now (the sweeper sends what is due anyway)."""
    return _send_io(settings, DELIVER_TASK, delivery_id)


def send_publish(settings: Settings, job_id: uuid.UUID, *, countdown: float = 0.0) -> bool:
    """Ask an I/O worker to publish a finished job (the sweeper re-sends publishes nobody holds)."""
    return _send_io(settings, PUBLISH_TASK, job_id, countdown=countdown or None)


def _send_io(settings: Settings, task: str, object_id: uuid.UUID, countdown: float | None = None) -> bool:
    try:
        celery_app(settings).send_task(task, args=[str(object_id)], queue=settings.io_queue, countdown=countdown,
                                       retry=False)
        return True
    except Exception as exc:  # broker down: the sweeper sends it later
        log.warning("could not enqueue %s for %s: %s", task, object_id, exc.__class__.__name__)
        return False


def gpu_queue_depth(settings: Settings) -> int | None:
    """Messages waiting in the GPU queues (every GPU count, all priority levels); None if the broker cannot
    say."""
    app = celery_app(settings)
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            return sum(_depth(conn.default_channel, q) for q in gpu_queue_names(settings))
    except Exception:  # noqa: BLE001 - unknown; callers fall back to the cautious choice
        return None


def _depth(channel, queue: str) -> int:
    """Messages in one queue; a queue the broker does not hold (Redis keeps no empty list) has none."""
    try:
        return int(channel.queue_declare(queue, passive=True).message_count)
    except ChannelError:
        return 0


def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    app = celery_app(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:
        return False
