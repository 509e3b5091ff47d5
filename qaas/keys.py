"""Creating and revoking API keys. The key is returned once and only its keyed hash is stored."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from qaas.db.models import ApiKey, utcnow
from qaas.security import generate_api_key, hash_api_key, key_display_prefix
from qaas.settings import Settings


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
    from qaas import auth_cache

    auth_cache.clear()  # this process forgets cached lookups now; others within QAAS_AUTH_CACHE_S
    return res.rowcount
