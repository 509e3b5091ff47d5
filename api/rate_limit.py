"""Rate limiting per API key: a token bucket, 429 problem+json with Retry-After when it is empty.

The bucket is keyed by a hash of the presented key (so an unknown key is limited like any other,
before it costs a database lookup) and lives in Redis when the broker is Redis -- one atomic Lua script
per request, shared by every API process -- or in this process otherwise (embedded mode). If Redis
cannot be reached the request is let through: limiting is protection, not a dependency that can take
the API down.

Why not the `limits` package (measured with `bench/rate_limit.py`, results in bench/results/rate_limit.md):
it has no token bucket -- its strategies are fixed, moving and sliding windows, and a window of `burst`
requests per `burst / rate` seconds gives the burst but then refills all at once, not one token per
1/rate s as documented for QAAS_RATE_LIMIT_BURST -- and it makes one Redis call per request: 160-185 µs
of API CPU per request against 24 µs here (a status read cost the API about 410 µs of CPU in the
2026-11-22 round of bench/results/load-notes.md -- 1.54 cores at 3,752/s -- so it would lose about a
quarter of its rate). The saving is the lease below, not the script: the same script called once per
request costs 207 µs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("qaas.api.rate_limit")

# KEYS[1] bucket; ARGV: rate per second, burst, now (s), wanted. Grants up to `wanted` whole tokens.
# Returns {granted, retry_after_ms}.
_LUA = """
local rate = tonumber(ARGV[1]); local burst = tonumber(ARGV[2]); local now = tonumber(ARGV[3]); local want = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(b[1]); local ts = tonumber(b[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local granted = math.min(want, math.floor(tokens))
local wait_ms = 0
if granted >= 1 then tokens = tokens - granted else granted = 0; wait_ms = math.ceil((1 - tokens) / rate * 1000) end
redis.call('HSET', KEYS[1], 't', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {granted, wait_ms}
"""
#: Tokens a process takes from Redis at once and spends locally (for at most LEASE_S): one Redis round
#: trip per few requests instead of one per request (it cost a quarter of a status read's time).
LEASE_TOKENS = 8
LEASE_S = 1.0


class _LocalBuckets:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, rate: float, burst: float) -> float:
        """0 if allowed, else seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens, ts = self.buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - ts) * rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                if len(self.buckets) > 100_000:  # forget idle keys (their buckets are full again anyway)
                    self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < burst / rate}
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / rate


class RateLimit:
    def __init__(self, app: ASGIApp, *, per_minute: int, burst: int, redis_url: str | None, secret: str) -> None:
        self.app = app
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.secret = secret.encode()
        self.local = _LocalBuckets()
        self.redis = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            import redis.asyncio as aioredis

            # one pool per process, reused by every request
            self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                                 max_connections=64)
            self.script = self.redis.register_script(_LUA)
        self._redis_down_until = 0.0
        #: bucket -> (tokens leased from Redis and not yet spent, lease expiry)
        self.leased: dict[str, tuple[int, float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0 or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and token.strip():
                    key = token.strip()
                break
        if key is None:  # 401 follows; nothing to count against
            await self.app(scope, receive, send)
            return
        bucket = "qaas:rl:" + hashlib.blake2b(key, key=self.secret[:64], digest_size=16).hexdigest()
        wait = await self._take(bucket)
        if wait > 0:
            await self._reject(send, scope, wait)
            return
        await self.app(scope, receive, send)

    async def _take(self, bucket: str) -> float:
        if self.redis is not None and time.monotonic() >= self._redis_down_until:
            now = time.monotonic()
            held, until = self.leased.get(bucket, (0, 0.0))
            if held > 0 and until > now:
                self.leased[bucket] = (held - 1, until)
                return 0.0
            want = max(1, min(LEASE_TOKENS, int(self.burst) // 4))
            try:
                granted, wait_ms = await self.script(keys=[bucket], args=[self.rate, self.burst, time.time(), want])
            except Exception as exc:  # noqa: BLE001 - Redis down: fall back to this process's buckets
                log.warning("rate limiter: Redis unavailable (%s); limiting in-process for 5 s", exc.__class__.__name__)
                self._redis_down_until = time.monotonic() + 5.0
                return self.local.take(bucket, self.rate, self.burst)
            granted = int(granted)
            if granted < 1:
                self.leased.pop(bucket, None)
                return int(wait_ms) / 1000.0
            if len(self.leased) > 100_000:
                self.leased.clear()
            self.leased[bucket] = (granted - 1, now + LEASE_S)
            return 0.0
        return self.local.take(bucket, self.rate, self.burst)

    async def _reject(self, send: Send, scope: Scope, wait: float) -> None:
        retry_after = max(1, math.ceil(wait))
        body = json.dumps({
            "type": "https://qaas.dev/problems/rate-limited", "title": "Too many requests", "status": 429,
            "detail": f"this API key is over its rate limit of {round(self.rate * 60)} requests per minute; "
                      f"retry in {retry_after} s",
            "instance": scope.get("path"),
        }).encode()
        await send({"type": "http.response.start", "status": 429, "headers": [
            (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})
