"""The FastAPI application factory."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from qaas.api import problems
from qaas.api.body_limit import BodySizeLimit
from qaas.api.dashboard import install as install_dashboard
from qaas.api.jobs.endpoints import router as jobs_router
from qaas.api.metrics import router as metrics_router
from qaas.api.rate_limit import RateLimit
from qaas.api.webhooks.endpoints import router as delivery_router
from qaas import __version__
from qaas.db.session import get_engine
from qaas.queue import broker_reachable
from qaas.settings import Settings, get_settings

log = logging.getLogger("qaas.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="qaas",
        version=__version__,
        description=(
            "Quantization as a service: submit GPTQ or bitsandbytes quantization jobs for Hugging Face "
            "causal language models, follow them live, download or publish the result. Errors are "
            "RFC 9457 problem details (application/problem+json)."
        ),
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.rate_limit_per_minute > 0:  # outermost: a limited caller costs no body read, no DB lookup
        app.add_middleware(RateLimit, per_minute=settings.rate_limit_per_minute, burst=settings.rate_limit_burst,
                           redis_url=settings.broker_url or None, secret=settings.secret_key.get_secret_value())
    problems.install(app)
    app.include_router(jobs_router)
    if settings.metrics_enabled:
        app.include_router(metrics_router)
    app.include_router(delivery_router)
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
                with get_engine(settings.resolved_database_url).connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            except Exception:
                return False

        db_ok = await run_in_threadpool(check_db)
        broker_ok = await run_in_threadpool(broker_reachable, settings)
        body = {"status": "ok" if db_ok and broker_ok else "unavailable",
                "checks": {"database": "ok" if db_ok else "down", "broker": "ok" if broker_ok else "down"}}
        return JSONResponse(body, status_code=200 if db_ok and broker_ok else 503)

    return app
