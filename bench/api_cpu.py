"""CPU per request of the API's hot paths, in-process: the app called through ASGI, no network, no server.

    .venv/bin/python -P bench/api_cpu.py [--requests 2000] [--label NAME]

`bench/load/run.py` measures the whole service under wrk, which on a shared 2-core machine is as much a
measure of the neighbours as of the code. This runs the same requests one after the other on one event
loop against the real PostgreSQL and Redis (rate limiting on, the key cache on, production settings) and
reports the process's CPU time per request -- the figure that decides how many requests an API worker
serves -- so two versions of the code can be compared side by side in one sitting: run it once per
checkout (an import root for another checkout: see bench/gpu_env.sh) with the same arguments.

Scenarios: GET /v1/jobs/{id}, GET /v1/jobs?limit=20, GET /v1/jobs/{id}/events, POST /v1/jobs (the
broker send included). Writes bench/results/api_cpu[-LABEL].json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
# the test assets where the tests look for them (QAAS_TEST_ASSETS), else the shared folder beside the checkout
ASSETS = Path(os.environ.get("QAAS_TEST_ASSETS", REPO.parent / "shared" / "assets"))
STORIES = (ASSETS / "models" / "stories260K").resolve()
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _database() -> str:
    import psycopg

    name = f"qaas_api_cpu_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _scenario(client, make_request, n: int) -> dict[str, float]:
    for _ in range(100):
        r = await make_request()
        assert r.status_code < 300, r.text
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        r = await make_request()
        assert r.status_code < 300, r.text
    return {"cpu_us": (time.process_time() - cpu) / n * 1e6, "wall_us": (time.perf_counter() - wall) / n * 1e6}


async def _run(settings, key: str, job_ids: list[str], n: int) -> dict[str, dict[str, float]]:
    import httpx

    from qaas.api.app import create_app

    app = create_app(settings)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": {"path": str(STORIES)}, "quantization_config": NF4}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api",
                                     headers=headers) as c:
            return {
                "GET /v1/jobs/{id}": await _scenario(c, lambda: c.get(f"/v1/jobs/{random.choice(job_ids)}"), n),
                "GET /v1/jobs?limit=20": await _scenario(c, lambda: c.get("/v1/jobs", params={"limit": 20}), n),
                "GET /v1/jobs/{id}/events": await _scenario(c, lambda: c.get(f"/v1/jobs/{random.choice(job_ids)}/events"), n),
                "POST /v1/jobs": await _scenario(c, lambda: c.post("/v1/jobs", json=body), n),
            }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--label", default="")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    args = ap.parse_args()

    import tempfile

    from qaas import job_store
    from qaas.db.migrate import upgrade
    from qaas.db.session import session_scope
    from qaas.keys import create_key
    from qaas.settings import Settings

    name = _database()
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    try:
        upgrade(url)
        settings = Settings(env="production", database_url=url, broker_url=args.redis, data_dir=Path(tempfile.mkdtemp()),
                            secret_key="api-cpu-bench-" + "0123456789abcdef" * 3, local_model_roots=str(STORIES.parent),
                            rate_limit_per_minute=10**7, rate_limit_burst=10**6, log_level="WARNING")
        with session_scope(url) as s:
            key = create_key(s, settings, name="bench", owner="bench")
            job_ids = [str(job_store.create_job(
                s, owner="bench", request={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                request_hash="h", idempotency_key=None, method="bitsandbytes", bits=4, source_model=str(STORIES),
                priority=0, max_attempts=3).id) for _ in range(200)]
        rows = asyncio.run(_run(settings, key, job_ids, args.requests))
    finally:
        _drop(name)
    import qaas

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node(), "python": platform.python_version(),
            "code": str(Path(qaas.__file__).resolve().parent.parent), "requests": args.requests}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"api_cpu{('-' + args.label) if args.label else ''}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"| request ({meta['code']}) | CPU µs / request | wall µs / request |\n|---|---|---|")
    for scenario, r in rows.items():
        print(f"| {scenario} | {r['cpu_us']:.0f} | {r['wall_us']:.0f} |")


if __name__ == "__main__":
    main()
