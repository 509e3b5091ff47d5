"""GET /metrics: Prometheus text format, computed from the database at scrape time (see qaas.metrics).

Unauthenticated, like every Prometheus endpoint: it shows counts and durations, no ids, models or
owners (worker names are host:pid). Keep it off the public listener (a reverse proxy rule) if that
matters to you, or set QAAS_METRICS_ENABLED=false.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qaas.db.session import get_sessionmaker
from qaas.metrics import registry_for

router = APIRouter(tags=["health"])


@router.get("/metrics", operation_id="metrics", include_in_schema=True,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
            response_class=Response)
async def metrics(request: Request) -> Response:
    """Jobs by state, stage durations, queue depth and age, workers, webhook outcomes, peak memory."""
    settings = request.app.state.settings
    registry = registry_for(get_sessionmaker(settings.database))
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
