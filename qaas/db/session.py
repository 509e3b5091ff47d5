"""The ORM side of database access: one engine per database per process, sessions, and a way to run a
session function from async code.

Every worker-side change and every API path that is not a hot read goes through here; the API's hot
paths on PostgreSQL run single statements on `qaas.db.direct` instead, beside the ORM function each must
equal (`qaas.job_store`, `qaas.keys`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

from qaas.db.config import Database, as_database

T = TypeVar("T")

#: A pooled connection unused for this long is checked with a round trip before it is handed out.
IDLE_PING_S = 2.0


def install_idle_ping(engine: Engine) -> None:
    """Pessimistic disconnect handling, but only for connections that sat idle: pool_pre_ping would add a
    round trip to every checkout. A connection in constant use that the server dropped fails its
    statement instead; SQLAlchemy then invalidates the whole pool, the request answers 503 (Retry-After)
    and the next one connects afresh -- so a PostgreSQL restart still heals by itself, at the cost of at
    most one 503 per process."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn, record) -> None:
        record.info["qaas_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
        since = record.info.get("qaas_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)  # what pool_pre_ping runs (autocommit, SELECT 1)
        except Exception as err:  # noqa: BLE001 - the pool retries with a fresh connection
            raise exc.DisconnectionError() from err


def get_engine(db: Database | str) -> Engine:
    return _engine(as_database(db))


@lru_cache(maxsize=8)
def _engine(db: Database) -> Engine:
    if db.url.startswith("sqlite"):
        engine = create_engine(db.url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    engine = create_engine(db.url, pool_size=db.pool_size, max_overflow=db.max_overflow, pool_timeout=5)
    install_idle_ping(engine)
    return engine


def get_sessionmaker(db: Database | str) -> sessionmaker[Session]:
    return _sessionmaker(as_database(db))


@lru_cache(maxsize=8)
def _sessionmaker(db: Database) -> sessionmaker[Session]:
    return sessionmaker(bind=_engine(db), expire_on_commit=False)


@contextmanager
def session_scope(db: Database | str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(db)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


async def in_thread(db: Database | str, fn: Callable[[Session], T]) -> T:
    """fn(session) in its own transaction (committed), from async code: in the thread pool, since the ORM
    engine blocks. The API's fallback where there is no direct path (embedded SQLite)."""
    import anyio.to_thread

    def run() -> T:
        with session_scope(db) as session:
            return fn(session)

    return await anyio.to_thread.run_sync(run)
