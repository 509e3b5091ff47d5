"""Direct PostgreSQL access for the API's hottest paths: one statement, one round trip, no ORM.

A status poll through SQLAlchemy's async session cost three round trips (BEGIN, SELECT, ROLLBACK),
a greenlet switch per await, statement cache keys and ORM instance loading -- about half of the API's
CPU per request. Here a statement runs on a pooled psycopg `AsyncConnection` in autocommit mode
(a single statement is its own transaction) and is prepared on the server the first time it is seen
(`prepare_threshold=0`), so a status read is one Bind/Execute and the row comes back as a tuple.

Only PostgreSQL: embedded mode (SQLite) keeps the ORM paths (`Database.direct` says which). The
statements themselves live beside the ORM functions they must equal (`qaas.job_store`, `qaas.keys`).

Connections belong to the event loop that opened them (a server has one loop; tests make one per
TestClient), so there is one pool per (URL, loop). A connection that sat idle longer than
`IDLE_PING_S` is pinged before use; a read that fails on a reused connection (the server restarted
under it) is retried once on a fresh one. Writes are not retried: the statement may have committed.
A database that cannot be reached raises `DatabaseUnavailable`, which the API answers with 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads
from pydantic_core import from_json

from qaas.db.config import Database, as_database
from qaas.db.session import IDLE_PING_S
from qaas.loop_local import LoopLocal


#: Longest a hot-path statement may run on the server.
STATEMENT_TIMEOUT_MS = 10_000


class DatabaseUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


def conninfo_of(url: str) -> str:
    # SQLAlchemy's URL scheme; libpq wants plain postgresql://
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class Pool:
    """A small pool of autocommit connections for one URL on one event loop."""

    def __init__(self, url: str, size: int, acquire_timeout_s: float = 5.0) -> None:
        self.conninfo = conninfo_of(url)
        self.size = size
        self.acquire_timeout_s = acquire_timeout_s
        self.slots = asyncio.Semaphore(size)
        #: (connection, monotonic time it was returned)
        self.idle: deque[tuple[psycopg.AsyncConnection, float]] = deque()

    async def _connect(self) -> psycopg.AsyncConnection:
        try:
            # statement_timeout: these are millisecond statements; one stuck behind a lock must not
            # hold a request (and a pool slot) forever -- it fails, and the request answers 503.
            conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, prepare_threshold=0,
                                                         connect_timeout=5,
                                                         options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(str(exc).splitlines()[0] if str(exc) else "cannot connect") from exc
        # JSONB columns parsed by pydantic-core's parser: the same values as json.loads (the documents are
        # pinned byte for byte to the ORM's in tests/api/test_direct_paths.py) at a third of the cost --
        # parsing the jobs' `request` documents was a tenth of a listing's CPU.
        set_json_loads(from_json, conn)
        return conn

    async def _checkout(self) -> tuple[psycopg.AsyncConnection, bool]:
        """A connection and whether it was reused from the pool (rather than opened now)."""
        while self.idle:
            conn, since = self.idle.pop()  # most recently used first: the warmest connection
            if conn.closed:
                continue
            if time.monotonic() - since >= IDLE_PING_S:
                try:
                    await conn.execute("SELECT 1")
                except psycopg.Error:
                    await _close(conn)
                    continue
            return conn, True
        return await self._connect(), False

    def _checkin(self, conn: psycopg.AsyncConnection) -> None:
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            asyncio.get_running_loop().create_task(_close(conn))
            return
        self.idle.append((conn, time.monotonic()))

    async def run(self, sql: str, params: tuple | list, *, fetch: str, retry: bool) -> Any:
        """Execute one statement; fetch is "one" (a tuple or None), "all" (a list) or "none" (rowcount)."""
        if self.slots.locked():  # every connection busy: wait, but not forever
            try:
                await asyncio.wait_for(self.slots.acquire(), self.acquire_timeout_s)
            except TimeoutError:
                raise DatabaseUnavailable("no database connection free in time") from None
        else:  # a slot is free: taken at once (wait_for would wrap the acquire in a task on every statement)
            await self.slots.acquire()
        try:
            for attempt in (1, 2):
                conn, reused = await self._checkout()
                try:
                    cur = await conn.execute(sql, params)
                    if fetch == "one":
                        out = await cur.fetchone()
                    elif fetch == "all":
                        out = await cur.fetchall()
                    else:
                        out = cur.rowcount
                except psycopg.errors.QueryCanceled as exc:  # statement_timeout: the connection is fine
                    self._checkin(conn)
                    raise DatabaseUnavailable("statement timed out") from exc
                except psycopg.OperationalError as exc:
                    await _close(conn)
                    if retry and reused and attempt == 1:
                        continue  # a stale connection (server restarted): once more on a fresh one
                    raise DatabaseUnavailable(exc.__class__.__name__) from exc
                except BaseException:
                    self._checkin(conn)
                    raise
                self._checkin(conn)
                return out
        finally:
            self.slots.release()

    async def close(self) -> None:
        while self.idle:
            await _close(self.idle.pop()[0])


async def _close(conn: psycopg.AsyncConnection) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: BLE001 - it is being thrown away
        pass


_pools: LoopLocal[Pool] = LoopLocal()


def pool_for(db: Database | str) -> Pool:
    """The running loop's pool for this database."""
    db = as_database(db)
    return _pools.get(db, lambda: Pool(db.url, size=db.pool_size))


async def fetch_one(db: Database | str, sql: str, params: tuple | list = ()) -> tuple | None:
    """One row of a read-only statement (retried once on a fresh connection after a server restart)."""
    return await pool_for(db).run(sql, params, fetch="one", retry=True)


async def fetch_all(db: Database | str, sql: str, params: tuple | list = ()) -> list[tuple]:
    return await pool_for(db).run(sql, params, fetch="all", retry=True)


async def fetch_all_written(db: Database | str, sql: str, params: tuple | list = ()) -> list[tuple]:
    """One writing statement (its own transaction) and every row it returns; never retried."""
    return await pool_for(db).run(sql, params, fetch="all", retry=False)


async def execute(db: Database | str, sql: str, params: tuple | list = ()) -> int:
    """One writing statement; the number of rows it touched. Never retried."""
    return await pool_for(db).run(sql, params, fetch="none", retry=False)


async def close_pools() -> None:
    """Close the pools of the running event loop (the API's shutdown)."""
    for pool in _pools.pop_running():
        await pool.close()
