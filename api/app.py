"""The FastAPI application factory."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from qaas.api import problems
from qaas.api.body_limit import BodySizeLimit
from qaas.api.dashboard import install as install_dashboard
from qaas.api.dispatch import drain_dispatchers
from qaas.api.hub_token.endpoints import router as hub_token_router
from qaas.api.jobs import document_cache
from qaas.api.jobs.cached_status import CachedStatusReads
from qaas.api.jobs.endpoints import router as jobs_router
from qaas.api.metrics import router as metrics_router
from qaas.api.rate_limit import RateLimit
from qaas.api.webhooks.endpoints import router as webhooks_router
from qaas import __version__
from qaas.db import direct
from qaas.db.session import get_engine
from qaas.queue import broker_reachable
from qaas.settings import Settings, get_settings

log = logging.getLogger("qaas.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Sync routes run in anyio's thread pool (40 threads by default); more threads than pooled database
        # connections only makes requests queue for a connection -- or open and close overflow ones.
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield
        await drain_dispatchers()  # messages of jobs accepted just before shutdown
        await document_cache.close_caches()
        await direct.close_pools()

    app = FastAPI(
        lifespan=lifespan,
        title="qaas",
        version=__version__,
        description=(
            "Quantization as a service: submit GPTQ or bitsandbytes quantization jobs for Hugging Face "
            "causal language models, follow them live, download or publish the result. Errors are "
            "RFC 9457 problem details (application/problem+json)."
        ),
    )
    app.state.settings = settings

    # innermost of ours: the rate limiter and the body-size limit see every request it answers
    app.add_middleware(CachedStatusReads, settings=settings)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.rate_limit_per_minute > 0:  # outermost: a limited caller costs no body read, no DB lookup
        app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst,
                           redis_url=settings.broker_url or None, secret=settings.secret_key.get_secret_value())
    problems.install(app)
    app.include_router(jobs_router)
    if settings.metrics_enabled:
        app.include_router(metrics_router)
    app.include_router(webhooks_router)
    app.include_router(hub_token_router)
    install_dashboard(app)

    @app.get("/healthz", tags=["health"], operation_id="healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], operation_id="readyz",
             responses={503: {"description": "a dependency is down"}})
    async def readyz():
        """Ready when the database and the broker answer."""

        def check_db() -> bool:
            try:
                with get_engine(settings.database).connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except Exception:
                return False

        db_ok = await run_in_threadpool(check_db)
        broker_ok = await run_in_threadpool(broker_reachable, settings)
        body = {"status": "ok" if db_ok and broker_ok else "unavailable",
                "checks": {"database": "ok" if db_ok else "down", "broker": "ok" if broker_ok else "down"}}
        return JSONResponse(body, status_code=200 if db_ok and broker_ok else 503)

    _document_problems(app)
    return app


def _document_problems(app: FastAPI) -> None:
    """Every /v1 operation can answer with problem details (401, 404, 422, 429, 503 and 413 on writes);
    the OpenAPI document says so, with the one ProblemDetails schema and media type they really use
    (FastAPI's default 422 is an application/json HTTPValidationError, which the API never sends)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("ProblemDetails", problems.ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}"))
        schemas.setdefault("FieldError", problems.FieldError.model_json_schema())
        schemas["ProblemDetails"].pop("$defs", None)
        ref = {"$ref": "#/components/schemas/ProblemDetails"}
        text = {401: "missing, unknown or revoked API key", 404: "no such resource (or not yours)",
                422: "invalid request; `errors` names each field", 429: "rate limited; see Retry-After",
                503: "a dependency (the database) is unavailable; see Retry-After", 413: "request body too large"}
        for path, ops in doc.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for method, op in ops.items():
                codes = [401, 404, 422, 429, 503] + ([413] if method in ("post", "put", "patch") else [])
                for code in codes:
                    entry = op.setdefault("responses", {}).setdefault(str(code), {"description": text[code]})
                    entry["content"] = {"application/problem+json": {"schema": ref}}
                    if code in (429, 503):
                        entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
                for code, entry in op.get("responses", {}).items():
                    content = entry.get("content") or {}
                    if code.startswith(("4", "5")) and "application/json" in content:
                        content.pop("application/json")
                        content["application/problem+json"] = {"schema": ref}
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
