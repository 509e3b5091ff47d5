"""The load benchmark's yardstick: uvicorn answering one constant JSON document, with no framework behind it.

Absolute request rates do not carry from one machine to another (another CPU, other neighbours on the
same cores), so `bench/load/run.py` measures this route in the same run, with the same uvicorn settings,
worker count and wrk settings as the real API, and reports every scenario as a fraction of its rate.

`app` is a bare ASGI callable: the least any uvicorn route can cost (HTTP parsing, the event loop, one
send). `fastapi_app` answers the same bytes through a one-route FastAPI application, for the share of a
request that is the framework itself. The document is read once at import from the file named by
QAAS_BENCH_TRIVIAL_BODY (run.py writes a real job-status answer there, so both answers carry the same bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

BODY = Path(os.environ["QAAS_BENCH_TRIVIAL_BODY"]).read_bytes()
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
}
_BODY = {"type": "http.response.body", "body": BODY}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(_START)
    await send(_BODY)


def _fastapi():
    from fastapi import FastAPI
    from fastapi.responses import Response

    fast = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @fast.get("/{path:path}")
    async def constant(path: str) -> Response:
        return Response(BODY, media_type="application/json")

    return fast


fastapi_app = _fastapi()
