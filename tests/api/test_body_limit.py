"""BodySizeLimit at the ASGI level: a body over the limit is a 413 however it is framed; an HTTP/1.x request
that announces no body (no Content-Length, no Transfer-Encoding) goes through untouched."""

from __future__ import annotations

import asyncio

from qaas.api.body_limit import BodySizeLimit


async def _reads_body(scope, receive, send):
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _call(app, http_version: str, headers: list, chunks: list[bytes]):
    sent = []
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "http_version": http_version, "method": "POST", "path": "/v1/jobs", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[-1]["body"]


def test_a_body_over_the_limit_is_refused_however_it_is_framed():
    app = BodySizeLimit(_reads_body, max_bytes=10)
    assert _call(app, "1.1", [(b"content-length", b"11")], [b"x" * 11])[0] == 413
    assert _call(app, "1.1", [(b"transfer-encoding", b"chunked")], [b"x" * 6, b"x" * 6])[0] == 413
    # HTTP/2 frames a body without either header: still counted
    assert _call(app, "2", [], [b"x" * 6, b"x" * 6])[0] == 413
    assert _call(app, "1.1", [(b"transfer-encoding", b"chunked")], [b"x" * 5, b"x" * 5]) == (200, b"10")


def test_an_http1_request_without_a_body_reaches_the_app_with_the_servers_own_receive_and_send():
    seen = {}

    async def app(scope, receive, send):
        seen["receive"], seen["send"] = receive, send

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(m):
        pass

    scope = {"type": "http", "http_version": "1.1", "method": "GET", "path": "/v1/jobs/x",
             "headers": [(b"authorization", b"Bearer k")]}
    asyncio.run(BodySizeLimit(app, max_bytes=10)(scope, receive, send))
    assert seen == {"receive": receive, "send": send}
