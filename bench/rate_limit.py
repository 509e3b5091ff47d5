"""What the per-key rate limiter costs an API request: qaas's token bucket against the `limits` package.

    .venv/bin/python -P bench/rate_limit.py [--requests 5000] [--redis redis://127.0.0.1:6379/13]

Each limiter admits `--requests` requests of one key, one after the other, on one event loop, against a
real Redis (the API's configuration: the bucket shared by every API process), with a limit high enough
never to refuse; it reports wall and CPU time per request (the CPU is what an API worker cannot spend
on other requests). Rows:

- `qaas (lease 8)`: `qaas.api.rate_limit.RateLimit` as the API runs it -- one atomic Lua call takes up
  to 8 tokens, spent locally within 1 s;
- `qaas (lease 1)`: the same script without the lease (one Redis call per request);
- `limits <strategy>`: `limits.aio` over `async+redis://` (redis-py), one `hit()` per request, for each
  strategy the package has (it has no token bucket).

Writes bench/results/rate_limit.json and rate_limit.md. Needs `pip install limits` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


async def _measure(take, n: int) -> dict[str, float]:
    for _ in range(50):  # connect, load the script, warm the caches
        await take()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        assert await take(), "the limit must never refuse in this benchmark"
    return {"wall_us": (time.perf_counter() - wall) / n * 1e6, "cpu_us": (time.process_time() - cpu) / n * 1e6}


async def _ours(redis_url: str, n: int, lease: int) -> dict[str, float]:
    from qaas.api import rate_limit

    saved = rate_limit.LEASE_TOKENS
    rate_limit.LEASE_TOKENS = lease
    try:
        limiter = rate_limit.RateLimit(None, per_minute=10**9, burst=10**6, redis_url=redis_url, secret="b" * 40)
        bucket = f"qaas:rl:bench-{lease}-{time.time_ns()}"
        return await _measure(lambda: _admitted(limiter._take(bucket)), n)
    finally:
        rate_limit.LEASE_TOKENS = saved


async def _admitted(wait) -> bool:
    return await wait == 0.0


async def _limits(redis_url: str, n: int, strategy: str) -> dict[str, float]:
    from limits import RateLimitItemPerSecond
    from limits.aio import strategies
    from limits.aio.storage import RedisStorage

    storage = RedisStorage("async+" + redis_url, implementation="redispy", socket_timeout=0.5)
    limiter = getattr(strategies, strategy)(storage)
    item = RateLimitItemPerSecond(10**6, 1)
    key = f"bench-{strategy}-{time.time_ns()}"
    return await _measure(lambda: limiter.hit(item, key), n)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = ap.parse_args()
    import limits
    import redis

    rows: dict[str, dict[str, float]] = {}
    for rnd in range(2):  # two rounds, interleaved; the lower of the two is kept (the machine is shared)
        runs = {
            "qaas (lease 8)": _ours(args.redis, args.requests, 8),
            "qaas (lease 1)": _ours(args.redis, args.requests, 1),
            "limits MovingWindowRateLimiter": _limits(args.redis, args.requests, "MovingWindowRateLimiter"),
            "limits SlidingWindowCounterRateLimiter": _limits(args.redis, args.requests, "SlidingWindowCounterRateLimiter"),
            "limits FixedWindowRateLimiter": _limits(args.redis, args.requests, "FixedWindowRateLimiter"),
        }
        for name, run in runs.items():
            got = await run
            best = rows.get(name)
            rows[name] = got if best is None else {k: min(best[k], got[k]) for k in got}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(), "limits": limits.__version__, "redis-py": redis.__version__,
            "requests": args.requests}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rate_limit.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Rate limiter cost per request ({meta['date']}, `bench/rate_limit.py`)", "",
             f"{meta['requests']} requests of one key, sequential, one event loop, Redis on loopback; "
             f"{meta['cpus']} shared CPUs, Python {meta['python']}, limits {meta['limits']}, redis-py {meta['redis-py']}. "
             "Lower of two interleaved rounds.", "",
             "| limiter | wall µs / request | CPU µs / request |", "|---|---|---|"]
    lines += [f"| {name} | {r['wall_us']:.0f} | {r['cpu_us']:.0f} |" for name, r in rows.items()]
    (RESULTS / "rate_limit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
