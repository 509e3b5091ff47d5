"""A real HTTP webhook receiver on loopback that records what arrives and answers as told."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str
    at: float


@dataclass
class Receiver:
    """`responses` are answered in order (then 200): e.g. [500, 500] fails twice, then succeeds."""

    responses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    port: int = 0

    def start(self) -> "Receiver":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                outer.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body, self.path, time.time()))
                status = outer.responses.pop(0) if outer.responses else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 60.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.received)} of {n} webhook requests arrived")
            time.sleep(0.1)
        return self.received
