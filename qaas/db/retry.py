"""Retrying database writes through a short outage (a PostgreSQL restart, a failover).

The worker must not lose a finished job's verdict because the database blinked; it retries
connection-level errors with backoff for a bounded time, then gives up loudly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from qaas.db.config import Database
from qaas.db.session import session_scope

T = TypeVar("T")
log = logging.getLogger("qaas.db")


def with_db_retry(db: Database | str, fn: Callable, *, deadline_s: float = 120.0, first_delay_s: float = 0.2) -> T:
    """Run fn(session) in its own transaction, retrying connection errors until the deadline."""
    delay = first_delay_s
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            with session_scope(db) as session:
                return fn(session)
        except (OperationalError, DBAPIError) as exc:
            connection_problem = isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False)
            if not connection_problem or time.monotonic() >= give_up:
                raise
            log.warning("database unavailable (%s); retrying in %.1fs", exc.__class__.__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
