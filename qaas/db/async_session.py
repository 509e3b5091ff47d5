"""Database reads from async code without a thread hop: psycopg's async driver under SQLAlchemy.

The API's hot read paths (status polls, listings, event streams, key checks) used to run in the
thread pool: two or three thread hand-offs and a pooled sync connection per request, which on a
2-core machine cost more than the query. `read(url, fn)` runs the same sync service function
(`fn(session)`, e.g. `job_store.get_job`) through `AsyncSession.run_sync` on the event loop, with
I/O done by the async driver. SQLite (embedded mode) has no async driver here: it falls back to the
thread pool, same function, same result.

One async engine per (URL, event loop): async connections belong to the loop that made them (tests
start a loop per TestClient; a server has one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from qaas.db.session import IDLE_PING_S, get_sessionmaker

T = TypeVar("T")
_engines: dict[tuple[str, int], tuple[asyncio.AbstractEventLoop, AsyncEngine, async_sessionmaker]] = {}


def _make(url: str) -> tuple[AsyncEngine, async_sessionmaker]:
    from qaas.settings import get_settings

    settings = get_settings()
    engine = create_async_engine(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
                                 pool_timeout=5)
    sync = engine.sync_engine

    @event.listens_for(sync, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:
        record.info["qaas_idle_since"] = time.monotonic()

    @event.listens_for(sync, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("qaas_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            sync.dialect.do_ping(dbapi_conn)
        except Exception as err:  # noqa: BLE001 - the pool retries with a fresh connection
            raise exc.DisconnectionError() from err

    return engine, async_sessionmaker(engine, expire_on_commit=False)


def _sessionmaker_for(url: str) -> async_sessionmaker:
    loop = asyncio.get_running_loop()
    key = (url, id(loop))
    hit = _engines.get(key)
    if hit is None or hit[0] is not loop:
        for k, (lp, _eng, _sm) in list(_engines.items()):  # forget engines of loops that are gone
            if lp.is_closed():
                del _engines[k]
        engine, maker = _make(url)
        _engines[key] = (loop, engine, maker)
        return maker
    return hit[2]


def supports_async(url: str) -> bool:
    return url.startswith(("postgresql+psycopg://", "postgresql://"))


def _async_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def _sync_read(url: str, fn: Callable) -> T:
    with get_sessionmaker(url)() as s:
        return fn(s)


async def read(url: str, fn: Callable) -> T:
    """fn(session) in a read-only transaction; without a thread on PostgreSQL."""
    if not supports_async(url):
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_sync_read, url, fn)
    async with _sessionmaker_for(_async_url(url))() as session:
        session: AsyncSession
        return await session.run_sync(fn)
