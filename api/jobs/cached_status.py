"""Status reads answered from this process's caches before FastAPI: `GET /v1/jobs/{id}` when both the
caller's key (the key cache, `deps.cached_caller`) and the job's document (`document_cache`) are cached.

With the document cached, a status read's remaining cost was the framework around it -- FastAPI's
exception and exit-stack middleware, walking the API's routes, the Request and Response objects -- about
three times what the answer itself costs. This middleware sits inside the rate limiter and the body-size
limit (every request is still counted and limited) and answers exactly the bytes and headers the route
(`endpoints.get_job`) would send for the same cached document. Anything else -- no cached key or
document, another path or method, a malformed id, an unauthenticated request -- goes on to FastAPI, so
every error, every miss and every other route is answered by the one implementation.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Receive, Scope, Send

from qaas.api import deps
from qaas.api.jobs import document_cache
from qaas.settings import Settings

_PREFIX = "/v1/jobs/"


class CachedStatusReads:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._cached_answer(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        # what `Response(body, media_type="application/json")` sends (tests/api/test_cached_status.py)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    def _cached_answer(self, scope: Scope) -> bytes | None:
        path = scope["path"]
        if not path.startswith(_PREFIX) or scope.get("root_path"):
            return None
        segment = path[len(_PREFIX):]
        if not segment or "/" in segment:  # another route (events, files, cancel) or the listing
            return None
        cache = document_cache.cache_for(self.settings)
        if cache is None:
            return None
        try:
            job_id = uuid.UUID(segment)  # as the route parses it (endpoints._parse_id)
        except ValueError:
            return None
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if authorization is None:
            return None
        key = deps.bearer_key(authorization.decode("latin-1"))
        caller = deps.cached_caller(self.settings, key) if key is not None else None
        if caller is None:
            return None
        return cache.get(job_id, caller.owner)
