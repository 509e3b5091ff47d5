"""Refuse request bodies over a size limit before they are read into memory (413)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _TooLarge(HTTPException):
    """An HTTPException so that the framework's body parsing passes it through as a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        framed = False  # the request says it has a body (Content-Length or Transfer-Encoding)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                framed = True
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(send)
                    return
            elif name == b"transfer-encoding":
                framed = True
        if not framed and scope.get("http_version") in ("1.0", "1.1"):
            # HTTP/1.x: a request with neither header has no body (RFC 9112, 6.3) -- every status poll.
            # Nothing to count, so no wrapped receive and send on the hot path.
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({
            "type": "https://qaas.dev/problems/request-too-large", "title": "Request too large", "status": 413,
            "detail": f"the request body is larger than {self.max_bytes} bytes",
            "errors": [{"field": "body", "message": f"larger than {self.max_bytes} bytes"}],
        }).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
