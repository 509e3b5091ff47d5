"""Where the database is and how many connections one process may hold to it.

The settings make one (`Settings.database`) and pass it to whatever opens connections -- the ORM
engine (`qaas.db.session`) and the direct pools (`qaas.db.direct`) -- so no pool reads global
settings of its own. A plain URL stands for the default pool sizes (scripts, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_POOL_SIZE = 20
DEFAULT_MAX_OVERFLOW = 10


@dataclass(frozen=True)
class Database:
    url: str
    #: Connections kept open per process (per event loop for the direct pools).
    pool_size: int = DEFAULT_POOL_SIZE
    #: More the ORM engine may open under a burst (the direct pools never exceed pool_size).
    max_overflow: int = DEFAULT_MAX_OVERFLOW

    @property
    def direct(self) -> bool:
        """PostgreSQL: the API's hot paths run as single statements on the direct pools (`qaas.db.direct`);
        anything else (embedded SQLite) goes through the ORM."""
        return self.url.startswith(("postgresql+psycopg://", "postgresql://"))


def as_database(db: Database | str) -> Database:
    return db if isinstance(db, Database) else Database(db)
