"""Sending "run job X" messages for jobs the API just accepted, in batches, off the event loop.

The job row is committed before anything is sent, so a message is a wake-up call, not the record:
if it never goes out the sweeper sends it (jobs with `dispatched_at` NULL). Celery's `send_task` is
blocking I/O, and with Redis down it blocks for its connect timeout; run on the event loop it would
stall every request of the process, and a thread hop per submission was a large part of a
submission's cost. So accepted jobs are handed to one `Dispatcher` per event loop, which publishes
whatever has accumulated at once -- on Redis as one pipeline from the loop's own async client
(`queue.RunMessages`), elsewhere in one worker thread call over one kombu producer -- and then marks
the whole batch dispatched with one UPDATE (`job_store.mark_dispatched_direct`).

`dispatch()` waits for its job's batch -- normally a millisecond or two -- so a client that gets its
202 finds the message already queued; but never longer than `wait_s`: the broker being slow or down
must not hold the answer hostage (the job is safely stored either way).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import anyio.to_thread

from qaas import job_store
from qaas.loop_local import LoopLocal
from qaas.queue import RunMessages, send_run_jobs
from qaas.settings import Settings

log = logging.getLogger("qaas.api.dispatch")

#: At most this many jobs per broker call; more wait for the next round.
BATCH = 256
#: Jobs waiting beyond this are left to the sweeper (a broker outage must not grow memory without bound).
MAX_PENDING = 10_000


@dataclass
class _Pending:
    job_id: uuid.UUID
    priority: int
    gpus: int
    done: asyncio.Future


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pending: list[_Pending] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        #: a batch is being sent right now
        self.busy = False
        #: On Redis the messages go out through the loop's own client (`queue.RunMessages`); other brokers
        #: (embedded mode's filesystem) through kombu in a worker thread.
        self.messages = RunMessages(settings) if settings.resolved_broker_url.startswith(("redis://", "rediss://")) else None

    async def dispatch(self, job_id: uuid.UUID, priority: int, gpus: int = 1, wait_s: float = 1.0) -> bool:
        """Queue the job's message; True once it is on the broker and marked, False if not (yet)."""
        if len(self.pending) >= MAX_PENDING:
            log.warning("dispatch backlog full; job %s is left to the sweeper", job_id)
            return False
        done = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(job_id, priority, gpus, done))
        self.wakeup.set()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name="qaas-dispatcher")
        try:
            return await asyncio.wait_for(asyncio.shield(done), wait_s)
        except TimeoutError:
            return False  # still pending: the dispatcher (or, failing that, the sweeper) sends it

    async def _run(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                batch, self.pending = self.pending[:BATCH], self.pending[BATCH:]
                self.busy = True
                try:
                    await self._send(batch)
                except Exception:  # noqa: BLE001 - never let the loop die; the sweeper covers these jobs
                    log.exception("dispatching %d jobs failed; the sweeper will send them", len(batch))
                    for p in batch:
                        if not p.done.done():
                            p.done.set_result(False)
                finally:
                    self.busy = False

    async def _send(self, batch: list[_Pending]) -> None:
        jobs = [(p.job_id, p.priority, p.gpus) for p in batch]
        if self.messages is not None:  # Redis: written from the event loop, no thread, no Celery machinery
            sent = await self.messages.send(jobs)
        else:
            sent = await anyio.to_thread.run_sync(send_run_jobs, self.settings, jobs)
        sent_ids = [p.job_id for p in batch[:sent]]
        if sent_ids:
            # Only what really went out is marked; a job the broker refused stays NULL for the sweeper.
            await job_store.mark_dispatched_direct(self.settings.database, sent_ids)
        for i, p in enumerate(batch):
            if not p.done.done():
                p.done.set_result(i < sent)


_dispatchers: LoopLocal[Dispatcher] = LoopLocal()


def dispatcher_for(settings: Settings) -> Dispatcher:
    """The dispatcher of the running event loop for these settings (its futures and task belong to the
    loop; it holds the settings, so their id cannot be reused while it exists)."""
    return _dispatchers.get(id(settings), lambda: Dispatcher(settings))


async def drain_dispatchers(timeout_s: float = 5.0) -> None:
    """At shutdown: send what is pending on this loop (bounded; the sweeper sends anything left)."""
    loop = asyncio.get_running_loop()
    for d in _dispatchers.pop_running():
        if d.task is None:
            continue
        deadline = loop.time() + timeout_s
        while (d.pending or d.busy) and not d.task.done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        d.task.cancel()
        try:
            await d.task
        except BaseException:  # noqa: BLE001 - cancelled (or already failed and logged)
            pass
        if d.messages is not None:
            await d.messages.close()
