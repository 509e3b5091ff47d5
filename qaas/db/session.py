"""Engines and sessions. One engine per database URL per process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

#: A pooled connection unused for this long is checked with a round trip before it is handed out.
IDLE_PING_S = 2.0


def install_idle_ping(engine: Engine) -> None:
    """Pessimistic disconnect handling, but only for connections that sat idle: pool_pre_ping would add a
    round trip to every checkout. A connection in constant use that the server dropped fails its
    statement instead; SQLAlchemy then invalidates the whole pool, the request answers 503 (Retry-After)
    and the next one connects afresh -- so a PostgreSQL restart still heals by itself, at the cost of at
    most one 503 per process. (For an async engine, pass its `sync_engine`.)"""

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


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    from qaas.settings import get_settings

    settings = get_settings()
    engine = create_engine(url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow, pool_timeout=5)

    install_idle_ping(engine)
    return engine


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
