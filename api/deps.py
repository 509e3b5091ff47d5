"""FastAPI dependencies: settings, a database session per request, the authenticated caller."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from qaas import auth_cache
from qaas.api.problems import Problem
from qaas.db.models import ApiKey
from qaas.db.session import get_sessionmaker
from qaas.security import hash_api_key
from qaas.settings import Settings


async def get_app_settings(request: Request) -> Settings:
    # async on purpose: FastAPI runs a sync dependency in the thread pool -- a thread hand-off per request
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    owner: str
    key_id: str


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def authenticate_key(session: Session, settings: Settings, key: str) -> Caller | None:
    """The caller a key belongs to, or None. Lookups are cached for QAAS_AUTH_CACHE_S (5 s): a key check
    was a database round trip on every request. A key revoked in another process keeps working in this
    one for at most that long."""
    if len(key) > 256:
        return None
    digest = hash_api_key(key, settings.secret_key.get_secret_value())
    ttl = settings.auth_cache_s
    if ttl > 0:
        hit = auth_cache.get(digest)
        if hit is not auth_cache.MISSING:
            return hit
    row = session.execute(
        select(ApiKey.id, ApiKey.owner, ApiKey.revoked_at).where(ApiKey.key_hash == digest)
    ).first()
    caller = None if row is None or row.revoked_at is not None else Caller(owner=row.owner, key_id=str(row.id))
    if ttl > 0:
        auth_cache.put(digest, caller, ttl)
    return caller


async def get_caller(request: Request, settings: SettingsDep) -> Caller:
    """Async: a cached key costs no thread and no query; a miss is one read on the async driver."""
    from qaas.db.async_session import read

    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("send 'Authorization: Bearer <api key>'")
    key = key.strip()
    caller = cached_caller(settings, key)
    if caller is auth_cache.MISSING:
        caller = await read(settings.resolved_database_url, lambda s: authenticate_key(s, settings, key))
    if caller is None:
        raise _unauthorized("the API key is not valid or was revoked")
    request.state.caller = caller
    return caller


def cached_caller(settings: Settings, key: str):
    if settings.auth_cache_s <= 0 or len(key) > 256:
        return auth_cache.MISSING
    return auth_cache.get(hash_api_key(key, settings.secret_key.get_secret_value()))


CallerDep = Annotated[Caller, Depends(get_caller)]
