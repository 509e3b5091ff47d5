"""API-key lookups cached per process for a few seconds (QAAS_AUTH_CACHE_S).

A key check was a database round trip on every request; the cache maps the key's keyed hash to the
caller (or to "no such key") until it expires. Revoking keys in this process clears it at once; a key
revoked by another process keeps working here for at most QAAS_AUTH_CACHE_S seconds.
"""

from __future__ import annotations

import time
from typing import Any

_entries: dict[str, tuple[float, Any]] = {}
_MISSING = object()
MAX_ENTRIES = 10_000


def get(digest: str) -> Any:
    """The cached value, or `MISSING`."""
    hit = _entries.get(digest)
    if hit is None or hit[0] <= time.monotonic():
        return _MISSING
    return hit[1]


def put(digest: str, value: Any, ttl: float) -> None:
    if len(_entries) >= MAX_ENTRIES:  # forged keys must not grow it without bound
        _entries.clear()
    _entries[digest] = (time.monotonic() + ttl, value)


def clear() -> None:
    _entries.clear()


MISSING = _MISSING
