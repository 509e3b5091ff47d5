"""FastAPI dependencies: settings, a database session per request, the authenticated caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from qaas import auth_cache, keys
from qaas.api.problems import Problem
from qaas.db.session import get_sessionmaker, in_thread
from qaas.keys import Caller
from qaas.security import hash_api_key
from qaas.settings import Settings

__all__ = ["Caller", "CallerDep", "SessionDep", "SettingsDep", "authenticate_key", "authenticate_request"]


async def get_app_settings(request: Request) -> Settings:
    # async on purpose: FastAPI runs a sync dependency in the thread pool -- a thread hand-off per request
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.database)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]

#: Longer than any key this service makes: not worth hashing, never a caller.
MAX_KEY_CHARS = 256


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, slug="unauthorized", headers={"WWW-Authenticate": "Bearer"})


def _digest(settings: Settings, key: str) -> str:
    return hash_api_key(key, settings.secret_key.get_secret_value())


def _cached(settings: Settings, digest: str):
    return auth_cache.get(digest) if settings.auth_cache_s > 0 else auth_cache.MISSING


def _remember(settings: Settings, digest: str, caller: Caller | None) -> Caller | None:
    """Lookups are cached for QAAS_AUTH_CACHE_S (5 s): a key check was a database round trip on every
    request. A key revoked in another process keeps working in this one for at most that long."""
    if settings.auth_cache_s > 0:
        auth_cache.put(digest, caller, settings.auth_cache_s)
    return caller


def authenticate_key(session: Session, settings: Settings, key: str) -> Caller | None:
    """The caller a key belongs to, or None (sync: the dashboard's sign-in form)."""
    if len(key) > MAX_KEY_CHARS:
        return None
    digest = _digest(settings, key)
    hit = _cached(settings, digest)
    return hit if hit is not auth_cache.MISSING else _remember(settings, digest, keys.caller_of(session, digest))


async def get_caller(request: Request, settings: SettingsDep) -> Caller:
    """The authenticated caller, as a dependency (`CallerDep`)."""
    return await authenticate_request(request, settings)


def bearer_key(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value, or None."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def cached_caller(settings: Settings, key: str) -> Caller | None:
    """The caller of a key when this process's key cache knows it (None: not cached, or not a caller);
    the status reads' fast path (api/jobs/cached_status.py) answers only for such callers."""
    if len(key) > MAX_KEY_CHARS:
        return None
    hit = _cached(settings, _digest(settings, key))
    return hit if isinstance(hit, Caller) else None


async def authenticate_request(request: Request, settings: Settings) -> Caller:
    """The caller of a request from its `Authorization: Bearer` key, or a 401 Problem. Async: a cached key
    costs no thread and no query; a miss is one direct read on PostgreSQL (the ORM in the thread pool
    elsewhere). Routes take it as `CallerDep`; the status read calls it itself (api/jobs/endpoints.py)."""
    key = bearer_key(request.headers.get("authorization", ""))
    if key is None:
        raise _unauthorized("send 'Authorization: Bearer <api key>'")
    caller = None
    if len(key) <= MAX_KEY_CHARS:
        digest = _digest(settings, key)
        caller = _cached(settings, digest)
        if caller is auth_cache.MISSING:
            db = settings.database
            found = (await keys.fetch_caller(db, digest) if db.direct
                     else await in_thread(db, lambda s: keys.caller_of(s, digest)))
            caller = _remember(settings, digest, found)
    if caller is None:
        raise _unauthorized("the API key is not valid or was revoked")
    request.state.caller = caller
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
