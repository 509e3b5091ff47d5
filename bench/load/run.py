"""Load benchmark of the real API (uvicorn, N worker processes) + PostgreSQL + Redis on this machine.

    .venv/bin/python -P bench/load/run.py [--api-workers 2] [--duration 20] [--connections 32] [--profile]

Absolute rates do not carry across machines, so every figure is also given as a fraction of two yardsticks
measured in the same run, right before each scenario: uvicorn answering a constant JSON document
(`trivial_app.py`, same worker count, same uvicorn and wrk settings, the same bytes as a real status answer)
from a bare ASGI callable (the least a uvicorn route costs; the spread of its runs is the run's noise) and
from a one-route FastAPI app (the framework the service runs on; the goals are judged against it).

What it does, in order (everything on loopback; the load generator is wrk, a separate C process):
  1. creates a throw-away database on the shared PostgreSQL, migrates it, makes 20 API keys and 2,000 jobs;
  2. starts `uvicorn qaas.api.main:app --workers N` with production-like settings (JSON logs, no access
     log, rate limiting ON through Redis with a limit high enough not to trigger), and the yardstick servers;
  3. per scenario (POST /v1/jobs; GET /v1/jobs/{id}; GET /v1/jobs), each right after the yardstick runs: wrk as
     fast as 32 connections go (closed loop: the most the service does), then paced at half that rate (an
     open-loop send schedule: the latency a client sees at that load); then GET /v1/jobs/{id} while 200 SSE
     streams are open (held by a Python asyncio client in another process), and the yardsticks once more;
  4. optionally (--profile) samples the API processes with py-spy during a status, a submission and a listing
     run (those of --only) and says which packages the samples fall in;
  5. writes bench/results/load.json and bench/results/load.md (the table against the goals).
Not a test: run on demand; results are committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "bench" / "results"
PG_ADMIN = os.environ.get("QAAS_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("QAAS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
SECRET = "bench-secret-key-" + "0123456789abcdef" * 3
# the test assets where the tests look for them (QAAS_TEST_ASSETS), else the shared folder beside the checkout
ASSETS = Path(os.environ.get("QAAS_TEST_ASSETS", REPO.parent / "shared" / "assets"))
STORIES = (ASSETS / "models" / "stories260K").resolve()

LUA_COMMON = r"""
local keys = {}
local ids = {}
for line in io.lines(os.getenv("QAAS_BENCH_KEYS")) do keys[#keys + 1] = line end
for line in io.lines(os.getenv("QAAS_BENCH_IDS")) do ids[#ids + 1] = line end
local counter = 0
local threads = {}
function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end
function init(args)
  math.randomseed(os.time() + id)
  non2xx = 0
end
-- Paced runs (QAAS_BENCH_RATE > 0): each thread hands out send slots on a fixed schedule (rate / threads
-- per second); a connection that is ready takes the next free slot and waits for it. With connections
-- to spare, requests go out at the offered rate however fast the answers come (an open loop).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } qaas_timeval;
int gettimeofday(qaas_timeval *tv, void *tz);
]]
local tv = ffi.new("qaas_timeval")
local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000
end
local rate = tonumber(os.getenv("QAAS_BENCH_RATE") or "0")
local interval_ms = rate > 0 and tonumber(os.getenv("QAAS_BENCH_THREADS")) * 1000 / rate or 0
local next_slot = nil
function delay()
  if interval_ms <= 0 then return 0 end
  local now = now_ms()
  if next_slot == nil or next_slot < now then next_slot = now end  -- a late slot is not made up in a burst
  local wait = next_slot - now
  next_slot = next_slot + interval_ms
  return math.floor(wait)
end
function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("non2xx") end
  local out = string.format('{"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, '
    .. '"p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f}',
    summary.requests, summary.duration, bad,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout + summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000, latency.mean / 1000)
  local f = io.open(os.getenv("QAAS_BENCH_OUT"), "w"); f:write(out); f:close()
end
"""

LUA = {
    "submit": r"""
local body_tpl = '{"model": {"path": "%s"}, "quantization_config": {"quant_method": "bitsandbytes", '
  .. '"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}, "options": {"priority": %d}}'
function request()
  counter = counter + 1
  local key = keys[(counter %% #keys) + 1]
  local body = string.format(body_tpl, os.getenv("QAAS_BENCH_MODEL"), counter %% 10)
  return wrk.format("POST", "/v1/jobs", {["Authorization"] = "Bearer " .. key,
                    ["Content-Type"] = "application/json"}, body)
end
""",
    "status": r"""
function request()
  local i = math.random(#ids)
  local key = keys[((i - 1) %% #keys) + 1]
  return wrk.format("GET", "/v1/jobs/" .. ids[i], {["Authorization"] = "Bearer " .. key})
end
""",
    "list": r"""
function request()
  local key = keys[math.random(#keys)]
  return wrk.format("GET", "/v1/jobs?limit=20", {["Authorization"] = "Bearer " .. key})
end
""",
}
# the yardstick gets exactly a status read's request line and headers (trivial_app.py answers any path)
LUA["trivial"] = LUA["status"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import psycopg

    with psycopg.connect(PG_ADMIN) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]
    import redis

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "postgresql": pg,
            "redis": redis.Redis.from_url(REDIS).info()["redis_version"],
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]}


def prepare(n_keys: int, n_jobs: int) -> tuple[str, list[str], list[str], str]:
    import psycopg

    from qaas.db.migrate import upgrade
    from qaas.db.session import session_scope
    from qaas.keys import create_key
    from qaas.settings import Settings

    name = f"qaas_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
    upgrade(url)
    settings = Settings(env="test", database_url=url, broker_url=REDIS, secret_key=SECRET)
    from qaas import job_store

    keys, ids = [], []
    with session_scope(url) as s:
        for i in range(n_keys):
            keys.append(create_key(s, settings, name=f"bench-{i}", owner=f"tenant-{i}"))
    with session_scope(url) as s:
        for j in range(n_jobs):
            owner = f"tenant-{j % n_keys}"
            job = job_store.create_job(s, owner=owner, request={"model": {"path": str(STORIES)}, "quantization_config": {
                "quant_method": "bitsandbytes", "load_in_4bit": True}, "options": {}}, request_hash="x", idempotency_key=None,
                method="bitsandbytes", bits=4, source_model=str(STORIES), priority=j % 10, max_attempts=3)
            ids.append(str(job.id))
    # the status scenario uses key (i % n_keys) for ids[i]: ids are ordered so that owner matches
    return url, keys, ids, name


def start_server(app: str, port: int, workers: int, log: Path, env: dict[str, str],
                 app_dir: str | None = None) -> subprocess.Popen:
    """`uvicorn.run(app, workers=N)` in its own process group, with the settings every server here shares
    (uvloop + httptools as uvicorn picks them, no access log, JSON logs at WARNING); waits for /healthz."""
    code = ("import logging, uvicorn; from qaas.logging_setup import setup_logging; setup_logging('json', 'WARNING'); "
            f"uvicorn.run({app!r}, host='127.0.0.1', port={port}, workers={workers}, app_dir={app_dir!r}, "
            "log_config=None, access_log=False, log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-P", "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{app} did not start: " + log.read_text()[-2000:])


def start_api(url: str, port: int, workers: int, log: Path, rate_limit: bool = True) -> subprocess.Popen:
    env = {"QAAS_ENV": "production", "QAAS_DATABASE_URL": url, "QAAS_BROKER_URL": REDIS,
           "QAAS_SECRET_KEY": SECRET, "QAAS_LOCAL_MODEL_ROOTS": str(STORIES.parent), "QAAS_LOG_FORMAT": "json",
           "QAAS_RATE_LIMIT_PER_MINUTE": "10000000" if rate_limit else "0", "QAAS_RATE_LIMIT_BURST": "100000",
           "QAAS_DATA_DIR": tempfile.mkdtemp(prefix="qaas-bench-data-"),
           "QAAS_GPU_QUEUE": "bench-gpu", "QAAS_IO_QUEUE": "bench-io"}
    return start_server("qaas.api.main:app", port, workers, log, env)


def start_yardstick(app: str, body: Path, port: int, workers: int, log: Path) -> subprocess.Popen:
    """trivial_app.py's `app` (bare ASGI) or `fastapi_app`, answering the bytes in `body`."""
    return start_server(f"trivial_app:{app}", port, workers, log, {"QAAS_BENCH_TRIVIAL_BODY": str(body)},
                        app_dir=str(HERE))


def wrk(scenario: str, base: str, work: Path, *, duration: int, connections: int, threads: int = 2,
        rate: float = 0.0) -> dict:
    """Closed loop (each connection sends its next request when the answer arrives), or, with `rate`,
    paced at about `rate` requests/s offered in total (latency then is what a client sees at that load)."""
    script = work / f"{scenario}.lua"
    script.write_text(LUA_COMMON + LUA[scenario].replace("%%", "%"))
    out = work / f"{scenario}.json"
    env = {**os.environ, "QAAS_BENCH_KEYS": str(work / "keys.txt"), "QAAS_BENCH_IDS": str(work / "ids.txt"),
           "QAAS_BENCH_OUT": str(out), "QAAS_BENCH_MODEL": str(STORIES), "QAAS_BENCH_RATE": str(rate),
           "QAAS_BENCH_THREADS": str(threads)}
    subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "5s",
                    "-s", str(script), base], env=env, check=True, capture_output=True, text=True)
    r = json.loads(out.read_text())
    r["rps"] = round(r["requests"] / (r["duration_us"] / 1e6), 1)
    r["connections"] = connections
    return r


def sse_holder(base: str, keys: list[str], ids: list[str], n: int, hold_s: float, out: Path) -> subprocess.Popen:
    """200 SSE clients in another process: each opens a stream, reads events, holds it for hold_s."""
    code = f"""
import asyncio, json, time, httpx
async def one(c, key, jid, stats):
    t0 = time.monotonic(); first = None; events = 0
    try:
        async with c.stream("GET", f"/v1/jobs/{{jid}}/events", headers={{"Authorization": "Bearer " + key,
                            "Accept": "text/event-stream"}}) as r:
            if r.status_code != 200:
                stats["errors"] += 1; return
            async for line in r.aiter_lines():
                if line.startswith("id:"):
                    events += 1
                    if first is None:
                        first = time.monotonic() - t0; stats["first_ms"].append(first * 1000)
                if time.monotonic() - t0 > {hold_s}:
                    break
        stats["ok"] += 1
    except Exception as exc:
        stats["errors"] += 1; stats["exc"] = repr(exc)
async def main():
    keys = {json.dumps(keys)}; ids = {json.dumps(ids)}
    stats = {{"ok": 0, "errors": 0, "first_ms": []}}
    limits = httpx.Limits(max_connections={n} + 10, max_keepalive_connections={n} + 10)
    async with httpx.AsyncClient(base_url="{base}", timeout=30, limits=limits) as c:
        await asyncio.gather(*[one(c, keys[i % len(keys)], ids[i], stats) for i in range({n})])
    f = sorted(stats.pop("first_ms")) or [0]
    stats.update(streams={n}, first_event_p50_ms=round(f[len(f)//2], 1), first_event_p99_ms=round(f[int(len(f)*0.99)-1], 1))
    open("{out}", "w").write(json.dumps(stats))
asyncio.run(main())
"""
    return subprocess.Popen([sys.executable, "-P", "-c", code])


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tck = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return total


def api_pids(root: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    grand = []
    for k in kids:
        grand += [int(p) for p in subprocess.run(["pgrep", "-P", str(k)], capture_output=True, text=True).stdout.split()]
    return [root, *kids, *grand]


def _sample(scenario: str, base: str, work: Path, pids: list[int], **kw) -> dict:
    """One wrk run with the server's CPU use over it (cores, and ms of CPU per answered request)."""
    c0 = cpu_seconds(pids)
    r = wrk(scenario, base, work, **kw)
    cpu = cpu_seconds(pids) - c0
    r["server_cpu_s_per_s"] = round(cpu / (r["duration_us"] / 1e6), 2)
    r["server_cpu_ms_per_request"] = round(1e3 * cpu / max(r["requests"], 1), 3)
    return r


def closed_and_half(scenario: str, base: str, work: Path, pids: list[int], *, duration: int, connections: int,
                    half: bool = True) -> dict:
    """The closed-loop run, then (half=True) a run paced at half the rate it reached."""
    out = {"closed": _sample(scenario, base, work, pids, duration=duration, connections=connections)}
    print(scenario, "closed", json.dumps(out["closed"]), flush=True)
    if half:
        rate = out["closed"]["rps"] / 2
        h = _sample(scenario, base, work, pids, duration=duration, connections=64, rate=rate)
        h["offered_rps"] = round(rate, 1)
        out["half_rate"] = h
        print(scenario, "half rate", json.dumps(h), flush=True)
    return out


def py_spy() -> str | None:
    """py-spy on PATH, or the one installed beside this Python (the venv's bin is often not on PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def profile_api(scenario: str, base: str, work: Path, worker_pids: list[int], *, duration: int,
                connections: int) -> dict:
    """py-spy on every API worker during one closed-loop run; the samples summarized by package."""
    from pyspy_summary import summarize

    files, procs = [], []
    for pid in worker_pids:
        out = work / f"profile-{scenario}-{pid}.txt"
        files.append(out)
        procs.append(subprocess.Popen([py_spy(), "record", "-p", str(pid), "-d", str(duration + 1), "-f", "raw",
                                       "-o", str(out), "--nonblocking", "--full-filenames"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    time.sleep(0.5)
    wrk(scenario, base, work, duration=duration, connections=connections)
    for p in procs:
        p.wait(timeout=duration + 30)
    summary = summarize([f for f in files if f.exists()])
    summary["files"] = [str(f) for f in files]
    print("profile", scenario, json.dumps(summary), flush=True)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--api-workers", type=int, default=2)
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--sse", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="py-spy the API workers during a status, a submit and a listing run (those of --only)")
    ap.add_argument("--label", default="", help="results go to load-LABEL.json/.md instead of load.json/.md")
    ap.add_argument("--no-rate-limit", action="store_true", help="measure without the Redis token bucket")
    ap.add_argument("--only", default="",
                    help="comma-separated scenarios among submit,status,list,sse,trivial_fastapi (the yardstick "
                         "always runs)")
    ap.add_argument("--submit-rate", type=float, default=0.0,
                    help="also pace submissions at this absolute rate (0: no such run)")
    ap.add_argument("--status-rate", type=float, default=0.0,
                    help="also pace status reads at this absolute rate (0: no such run)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    if args.profile and not py_spy():
        sys.exit("--profile needs py-spy (pip install -c constraints.txt -e '.[bench]')")
    sys.path.append(str(HERE))  # the sibling modules (run with -P, the script's folder is not on the path)
    from load_report import write_md

    url, keys, ids, dbname = prepare(n_keys=20, n_jobs=2000)
    work = Path(tempfile.mkdtemp(prefix="qaas-load-"))
    (work / "keys.txt").write_text("\n".join(keys) + "\n")
    # ids[i] belongs to tenant i % 20, which the status script pairs with keys[(i-1) % 20] in Lua's 1-based terms
    (work / "ids.txt").write_text("\n".join(ids) + "\n")
    port, ys_port, yf_port = free_port(), free_port(), free_port()
    base, ys_base, yf_base = (f"http://127.0.0.1:{p}" for p in (port, ys_port, yf_port))
    servers = [start_api(url, port, args.api_workers, work / "api.log", rate_limit=not args.no_rate_limit)]
    only = set(filter(None, args.only.split(",")))
    results: dict = {"machine": machine(), "api_workers": args.api_workers, "duration_s": args.duration,
                     "connections": args.connections,
                     "command": " ".join(["python -P bench/load/run.py", *sys.argv[1:]]), "label": args.label,
                     "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": {}}
    try:
        import httpx

        # the yardstick answers the bytes of a real status answer
        body = httpx.get(f"{base}/v1/jobs/{ids[0]}", headers={"Authorization": f"Bearer {keys[0]}"}).content
        (work / "status-body.json").write_bytes(body)
        servers.append(start_yardstick("app", work / "status-body.json", ys_port, args.api_workers, work / "ys.log"))
        if not only or "trivial_fastapi" in only:
            servers.append(start_yardstick("fastapi_app", work / "status-body.json", yf_port, args.api_workers,
                                           work / "yf.log"))
        # warm-up: imports, pools, prepared statements, caches, the broker connection
        wrk("status", base, work, duration=3, connections=8)
        wrk("submit", base, work, duration=2, connections=4)
        wrk("trivial", ys_base, work, duration=2, connections=8)
        pids = api_pids(servers[0].pid)
        ys_pids = api_pids(servers[1].pid)
        kw = {"duration": args.duration, "connections": args.connections}
        yardstick = {"body_bytes": len(body), "runs": []}
        results["yardstick"] = yardstick
        fastapi_pids = api_pids(servers[2].pid) if len(servers) > 2 else None

        def yardstick_now() -> tuple[float, float | None]:
            """The yardsticks run right before a scenario (on a shared machine the speed moves within a run, so
            each scenario is compared with the yardsticks measured next to it): the bare ASGI callable (the
            first run also at half rate) and, when it runs, the one-route FastAPI app (closed loop)."""
            yardstick["runs"].append(closed_and_half("trivial", ys_base, work, ys_pids, half=not yardstick["runs"],
                                                     **kw))
            fastapi = None
            if fastapi_pids is not None:
                r = closed_and_half("trivial", yf_base, work, fastapi_pids, half=False, **kw)
                yardstick.setdefault("trivial_fastapi", r)
                yardstick.setdefault("fastapi_runs", []).append(r)
                fastapi = r["closed"]["rps"]
            return yardstick["runs"][-1]["closed"]["rps"], fastapi

        for scenario in ("submit", "status", "list"):
            if not only or scenario in only:
                paired, paired_fastapi = yardstick_now()
                results["scenarios"][scenario] = closed_and_half(scenario, base, work, pids, **kw)
                results["scenarios"][scenario]["yardstick_rps"] = paired
                if paired_fastapi is not None:
                    results["scenarios"][scenario]["fastapi_yardstick_rps"] = paired_fastapi
        for scenario, rate in (("submit", args.submit_rate), ("status", args.status_rate)):
            if rate > 0:
                r = _sample(scenario, base, work, pids, duration=args.duration, connections=64, rate=rate)
                r["offered_rps"] = rate
                results["scenarios"][f"{scenario}_fixed_rate"] = r
                print(f"{scenario} paced at {rate}/s", json.dumps(r), flush=True)
        if not only or "sse" in only:
            # held through the status run and the yardstick run after it
            holder = sse_holder(base, keys, ids, args.sse, hold_s=2 * args.duration + 15, out=work / "sse.json")
            time.sleep(5)  # streams open
            c0 = cpu_seconds(pids)
            idle = time.monotonic()
            time.sleep(3)
            sse_cpu = (cpu_seconds(pids) - c0) / (time.monotonic() - idle)
            r = closed_and_half("status", base, work, pids, half=False, **kw)
            # the streams are still open: the yardsticks share the machine with them
            r["yardstick_rps"], paired_fastapi = yardstick_now()
            if paired_fastapi is not None:
                r["fastapi_yardstick_rps"] = paired_fastapi
            r["sse_streams_open"] = args.sse
            r["server_cpu_s_per_s_of_sse_alone"] = round(sse_cpu, 2)
            results["scenarios"]["status_with_sse"] = r
            holder.wait(timeout=2 * args.duration + 75)
            results["scenarios"]["sse"] = json.loads((work / "sse.json").read_text())
            print("sse", results["scenarios"]["sse"], flush=True)
        if args.profile:
            workers = pids[1:] or pids
            # the scenarios of this run (all three without --only)
            profiled = [s for s in ("status", "submit", "list") if not only or s in only]
            results["profile"] = {s: profile_api(s, base, work, workers, **kw) for s in profiled}
    finally:
        for proc in servers:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        import redis

        redis.Redis.from_url(REDIS).flushdb()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"load{('-' + args.label) if args.label else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(write_md(results, RESULTS / f"{stem}.md"))
    print(f"wrote {RESULTS / stem}.json/.md; work dir {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
