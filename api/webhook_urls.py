"""Checking webhook URLs when they are submitted (the delivery re-checks at send time).

Literal addresses in refused ranges are a 422 at once; host names are resolved and checked at
delivery time, where the connection is pinned to the checked address (qaas.kit.ssrf).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from qaas.api.problems import Problem
from qaas.kit import ssrf
from qaas.settings import Settings


def check_webhook_url(settings: Settings, url: str, *, field: str) -> str:
    def invalid(message: str) -> Problem:
        return Problem(422, "Invalid request", f"{field}: {message}", slug="validation-error",
                       errors=[{"field": field, "message": message}])

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise invalid("only http and https URLs are accepted")
    if parts.username or parts.password:
        raise invalid("URLs with credentials are not accepted")
    host = (parts.hostname or "").rstrip(".")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None or host in ("localhost",) or host.endswith(".localhost"):
        try:
            # resolver: literals need none; "localhost" names resolve to loopback by definition
            ssrf.check_url(url, settings.webhook_allowlist, resolver=lambda h, p: ["127.0.0.1"])
        except ssrf.UnsafeDestination as exc:
            raise invalid(f"refused destination: {exc.reason}")
    return url
