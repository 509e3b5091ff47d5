"""API keys: creating and revoking them, and finding whose a presented key is.

The key is returned once and only its keyed hash is stored (`qaas.security.hash_api_key`). The lookup
has an ORM function and, for the API's hot path on PostgreSQL, a direct twin beside it that must equal it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qaas import auth_cache
from qaas.db import direct
from qaas.db.config import Database
from qaas.db.models import ApiKey, utcnow
from qaas.security import generate_api_key, hash_api_key, key_display_prefix
from qaas.settings import Settings


@dataclass(frozen=True)
class Caller:
    """Who a valid key belongs to: the owner (tenant) whose jobs it sees, and the key's id."""

    owner: str
    key_id: str


def create_key(session: Session, settings: Settings, *, name: str, owner: str) -> str:
    if not owner or len(owner) > 64 or not name or len(name) > 128:
        raise ValueError("owner must be 1-64 and name 1-128 characters")
    key = generate_api_key()
    session.add(ApiKey(owner=owner, name=name, prefix=key_display_prefix(key),
                       key_hash=hash_api_key(key, settings.secret_key.get_secret_value())))
    session.flush()
    return key


def revoke_keys(session: Session, prefix: str) -> int:
    res = session.execute(update(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow()))
    auth_cache.clear()  # this process forgets cached lookups now; others within QAAS_AUTH_CACHE_S
    return res.rowcount


def _caller(row) -> Caller | None:
    """A key row (id, owner, revoked_at) as its caller; a revoked key has none."""
    if row is None or row[2] is not None:
        return None
    return Caller(owner=row[1], key_id=str(row[0]))


def caller_of(session: Session, key_hash: str) -> Caller | None:
    return _caller(session.execute(
        select(ApiKey.id, ApiKey.owner, ApiKey.revoked_at).where(ApiKey.key_hash == key_hash)).first())


_CALLER_SQL = "SELECT id, owner, revoked_at FROM api_keys WHERE key_hash = %s"


async def fetch_caller(db: Database, key_hash: str) -> Caller | None:
    """`caller_of` as one statement on a direct connection."""
    return _caller(await direct.fetch_one(db, _CALLER_SQL, (key_hash,)))
