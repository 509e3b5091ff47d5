"""Checking a webhook URL when it is submitted (the delivery checks again, at send time).

Literal addresses in refused ranges are refused at once; host names are resolved and checked at
delivery time, where the connection is pinned to the checked address (`qaas.kit.ssrf`), since what a
name resolves to at submission says nothing about what it will resolve to later.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from qaas.kit import ssrf


class RefusedUrl(ValueError):
    """The URL cannot be a webhook; `reason` is safe to show to whoever submitted it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_webhook_url(url: str, allowlist: str) -> str:
    """The URL, if it may be a webhook destination; raises RefusedUrl otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedUrl("only http and https URLs are accepted")
    if parts.username or parts.password:
        raise RefusedUrl("URLs with credentials are not accepted")
    host = (parts.hostname or "").rstrip(".")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None or host in ("localhost",) or host.endswith(".localhost"):
        try:
            # resolver: literals need none; "localhost" names resolve to loopback by definition
            ssrf.check_url(url, allowlist, resolver=lambda h, p: ["127.0.0.1"])
        except ssrf.UnsafeDestination as exc:
            raise RefusedUrl(f"refused destination: {exc.reason}")
    return url
