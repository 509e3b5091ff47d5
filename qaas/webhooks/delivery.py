"""One webhook delivery attempt, and the retry schedule (pure functions).

`deliver_once(...)` sends one signed Standard Webhooks request through `ssrf.safe_request` and classifies it:

- SUCCESS   2xx
- GONE      410: the receiver asks us to stop; disable the endpoint
- RETRY     429, 408, 5xx, timeout, connection error, DNS failure: try again after `next_retry_s`
            (the schedule's delay with jitter, or `Retry-After` when that is later)
- EXHAUSTED a RETRY outcome when the schedule has no attempt left: flag the endpoint
- FAILED    final: any other 4xx, a redirect (never followed), an unsafe destination, an invalid URL

The caller (the outbox task) keeps `msg_id` stable across attempts of one event, records every result, and
schedules the next attempt `next_retry_s` seconds later. Nothing here touches the database or the queue.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from qaas.kit import ssrf
from qaas.webhooks.signing import signature_headers

SUCCESS, GONE, RETRY, EXHAUSTED, FAILED = "success", "gone", "retry", "exhausted", "failed"

# Delay before attempt n+1 after attempt n failed (n = 1..9): 5s, 5m, 30m, 2h, 5h, 10h, 14h, 20h, 20h.
# Ten attempts over ~3 days (sum ≈ 71.6 h).
RETRY_SCHEDULE_S: tuple[int, ...] = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 72000)
MAX_ATTEMPTS = len(RETRY_SCHEDULE_S) + 1
JITTER = 0.2  # ±20%
MAX_RETRY_AFTER_S = 24 * 3600  # a Retry-After further out than this is capped
EXCERPT_CHARS = 1024
USER_AGENT = "qaas-webhooks/1.0"
RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))


# ----------------------------------------------------------------------------------------------- schedule
def retry_delay(
    attempt: int, *, rng: Callable[[], float] = random.random, jitter: float = JITTER,
    schedule: Sequence[float] = RETRY_SCHEDULE_S,
) -> float | None:
    """Seconds to wait after failed attempt number `attempt` (1-based), or None when none is left."""
    if attempt < 1 or attempt > len(schedule):
        return None
    base = schedule[attempt - 1]
    return base * (1 + jitter * (2 * rng() - 1))


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date); None if absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def next_retry_delay(
    attempt: int, retry_after: float | None = None, *, rng: Callable[[], float] = random.random,
    schedule: Sequence[float] = RETRY_SCHEDULE_S,
) -> float | None:
    """The schedule's delay after `attempt`, pushed out to `Retry-After` when the receiver asks for later."""
    delay = retry_delay(attempt, rng=rng, schedule=schedule)
    if delay is None:
        return None
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def total_schedule_s() -> int:
    return sum(RETRY_SCHEDULE_S)


# ----------------------------------------------------------------------------------------------- payload
def build_body(event_type: str, payload: Mapping[str, Any], event_time: datetime | None = None) -> bytes:
    """The Standard Webhooks envelope `{"type", "timestamp", "data"}`, compact JSON.

    Pass the event's own time (e.g. the outbox row's creation) so retries send the same body.
    """
    when = (event_time or datetime.now(timezone.utc)).astimezone(timezone.utc)
    envelope = {"type": event_type, "timestamp": when.isoformat().replace("+00:00", "Z"), "data": dict(payload)}
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True, default=str).encode()


# ----------------------------------------------------------------------------------------------- attempt
@dataclass
class DeliveryResult:
    outcome: str  # SUCCESS | GONE | RETRY | EXHAUSTED | FAILED
    attempt: int
    status_code: int | None
    duration_ms: int
    response_excerpt: str  # first EXCERPT_CHARS of the response body (utf-8, lossy)
    error: str | None  # why it did not succeed, for the deliveries list
    next_retry_s: float | None  # only for RETRY
    msg_id: str
    timestamp: int  # the webhook-timestamp sent
    ip: str | None = None

    @property
    def done(self) -> bool:
        return self.outcome != RETRY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deliver_once(
    url: str,
    secrets: str | Iterable[str],
    msg_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    *,
    allowlist: str | Iterable[str] | ssrf.Allowlist | None = None,
    attempt: int = 1,
    event_time: datetime | None = None,
    timeout: float = 10.0,
    resolver: ssrf.Resolver | None = None,
    rng: Callable[[], float] = random.random,
    now: Callable[[], float] = time.time,
    verify: Any = True,
    transport: httpx.BaseTransport | None = None,
    schedule: Sequence[float] = RETRY_SCHEDULE_S,
) -> DeliveryResult:
    """Send attempt number `attempt` of event `msg_id` to `url`, signed with every secret in `secrets`.

    `schedule` is the retry backoff (operators may shorten it; tests do)."""
    body = build_body(event_type, payload, event_time)
    ts = int(now())
    headers = {
        **signature_headers(secrets, msg_id, body, timestamp=ts),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }
    start = time.monotonic()

    def result(outcome: str, *, status: int | None = None, excerpt: str = "", error: str | None = None,
               retry_after: float | None = None, ip: str | None = None) -> DeliveryResult:
        next_s = None
        if outcome == RETRY:
            next_s = next_retry_delay(attempt, retry_after, rng=rng, schedule=schedule)
            if next_s is None:
                outcome = EXHAUSTED
                error = f"{error}; no attempts left after {attempt}"
        return DeliveryResult(outcome, attempt, status, int((time.monotonic() - start) * 1000), excerpt, error,
                              next_s, msg_id, ts, ip)

    try:
        resp = ssrf.safe_request("POST", url, headers=headers, content=body, allowlist=allowlist, timeout=timeout,
                                 resolver=resolver, verify=verify, transport=transport)
    except ssrf.UnsafeDestination as e:
        return result(FAILED, error=f"unsafe destination: {e.reason}")
    except ssrf.ResolutionError as e:
        return result(RETRY, error=str(e))
    except httpx.TimeoutException as e:
        return result(RETRY, error=f"timeout: {type(e).__name__}")
    except httpx.TransportError as e:
        return result(RETRY, error=f"connection error: {type(e).__name__}: {e}")

    status = resp.status_code
    excerpt = resp.content.decode("utf-8", "replace")[:EXCERPT_CHARS]
    if 200 <= status < 300:
        return result(SUCCESS, status=status, excerpt=excerpt, ip=resp.ip)
    if status == 410:
        return result(GONE, status=status, excerpt=excerpt, error="410 Gone: the receiver asked to stop", ip=resp.ip)
    if status in RETRYABLE_STATUS:
        retry_after = parse_retry_after(resp.headers.get("retry-after"), now=now())
        return result(RETRY, status=status, excerpt=excerpt, error=f"HTTP {status}", retry_after=retry_after, ip=resp.ip)
    if 300 <= status < 400:
        where = resp.headers.get("location", "")
        return result(FAILED, status=status, excerpt=excerpt, error=f"redirect ({status} to {where!r}) not followed", ip=resp.ip)
    return result(FAILED, status=status, excerpt=excerpt, error=f"HTTP {status}", ip=resp.ip)
