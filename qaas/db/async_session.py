"""Database reads from async code without a thread hop: psycopg's async driver under SQLAlchemy.

The API's hot read paths (status polls, listings, event streams, key checks) used to run in the
thread pool: two or three thread hand-offs and a pooled sync connection per request, which on a
2-core machine cost more than the query. `read(url, fn)` runs the same sync service function
(`fn(session)`, e.g. `job_store.get_job`) through `AsyncSession.run_sync` on the event loop, with
I/O done by the async driver. SQLite (embedded mode) has no async driver here: it falls back to the
thread pool, same function, same result.

One async engine per (URL, event loop) (`qaas.loop_local`): async connections belong to the loop that made them (tests
start a loop per TestClient; a server has one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from qaas.db.direct import supports as supports_direct
from qaas.db.session import get_sessionmaker, install_idle_ping
from qaas.loop_local import LoopLocal

T = TypeVar("T")
_makers: LoopLocal[async_sessionmaker] = LoopLocal()


def _make(url: str) -> async_sessionmaker:
    from qaas.settings import get_settings

    settings = get_settings()
    engine = create_async_engine(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
                                 pool_timeout=5)
    install_idle_ping(engine.sync_engine)
    return async_sessionmaker(engine, expire_on_commit=False)


def _sessionmaker_for(url: str) -> async_sessionmaker:
    return _makers.get(url, lambda: _make(url))


def _async_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1) if url.startswith("postgresql://") else url


def _sync_read(url: str, fn: Callable) -> T:
    with get_sessionmaker(url)() as s:
        return fn(s)


async def read(url: str, fn: Callable) -> T:
    """fn(session) in a read-only transaction; without a thread on PostgreSQL."""
    if not supports_direct(url):
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_sync_read, url, fn)
    async with _sessionmaker_for(_async_url(url))() as session:
        session: AsyncSession
        return await session.run_sync(fn)
