"""Storing the jobs the API accepts, a batch per statement: a group commit per event loop.

Each submission's INSERT was a round trip and a commit (a WAL flush) of its own, the largest part of a
submission's cost on the API's side and on PostgreSQL's. Here submissions hand their rows to one
`JobInserter` per event loop: whatever arrived while the previous statement was in flight is stored by the
next one (`job_store.insert_jobs_direct`: one multi-row INSERT, one commit), so a lone submission is stored
at once and a burst shares its round trips. Each request still gets only its own row back, after that row
committed, so the durability order (row, then message, then answer) is unchanged. If a batch's statement
fails, its rows are tried again one at a time: one row the database refuses fails only its own request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qaas import job_store
from qaas.db.config import Database
from qaas.db.direct import DatabaseUnavailable
from qaas.loop_local import LoopLocal
from qaas.settings import Settings


class JobInserter:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def insert(self, fields: dict[str, Any]) -> dict[str, Any] | None:
        """`job_store.insert_job_direct(**fields)`, stored with whatever else is waiting."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append((fields, done))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain(), name="qaas-job-inserts")
        return await done

    async def _drain(self) -> None:
        batch: list = []
        try:
            while self.pending:
                n = job_store.MAX_INSERT_ROWS
                batch, self.pending = self.pending[:n], self.pending[n:]
                await self._store(batch)
        except BaseException as exc:  # cancelled at shutdown: nobody may wait forever
            for _fields, done in batch + self.pending:
                if not done.done():
                    done.set_exception(exc if isinstance(exc, Exception) else RuntimeError("shutting down"))
            self.pending = []
            raise

    async def _store(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        try:
            rows = await job_store.insert_jobs_direct(self.db, [fields for fields, _done in batch])
        except DatabaseUnavailable as exc:  # down or timed out: the same for every row (503 each)
            for _fields, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:  # each on its own: the refused row fails only its request
                    await self._store([item])
            elif not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        for (_fields, done), row in zip(batch, rows):
            if not done.done():  # a request that went away: its row is stored all the same
                done.set_result(row)


_inserters: LoopLocal[JobInserter] = LoopLocal()


def inserter_for(settings: Settings) -> JobInserter:
    """The running loop's inserter for these settings' database."""
    db = settings.database
    return _inserters.get(db, lambda: JobInserter(db))
