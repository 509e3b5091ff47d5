"""1,000 jobs queued at once drain through one worker in priority/age order, none lost or duplicated.

    .venv/bin/python -P bench/load/drain.py [--jobs 1000]

The worker runs the test-only fake engine (QAAS_FAKE_ENGINE=1 with QAAS_ENV=test: a real child process
per job, the real protocol and supervision, no quantization) so that a thousand jobs take minutes, not
days. Jobs are submitted over HTTP to the real API while no worker runs, then one worker is started.
Writes bench/results/load-drain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    args = ap.parse_args()
    import httpx
    import psycopg

    url, keys, _ids, dbname = R.prepare(n_keys=4, n_jobs=0)
    data = Path(tempfile.mkdtemp(prefix="qaas-drain-"))
    queue = f"drain-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "QAAS_ENV": "test", "QAAS_DATABASE_URL": url, "QAAS_BROKER_URL": R.REDIS,
           "QAAS_SECRET_KEY": R.SECRET, "QAAS_LOCAL_MODEL_ROOTS": str(R.STORIES.parent), "QAAS_DATA_DIR": str(data),
           "QAAS_GPU_QUEUE": queue, "QAAS_IO_QUEUE": queue + "-io", "QAAS_FAKE_ENGINE": "1",
           "QAAS_FAKE_ENGINE_STEP_S": "0", "QAAS_RATE_LIMIT_PER_MINUTE": "0", "QAAS_LOG_FORMAT": "json",
           "QAAS_LOG_LEVEL": "WARNING", "QAAS_HEARTBEAT_INTERVAL_S": "1", "QAAS_SWEEP_INTERVAL_S": "2"}
    port = R.free_port()
    api = subprocess.Popen([sys.executable, "-P", "-c", "from qaas.cli import main; main()", "api", "--port", str(port),
                            "--no-access-log"], env=env, stdout=open(data / "api.log", "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    worker = None
    base = f"http://127.0.0.1:{port}"
    try:
        R_wait(base)
        body = lambda p: {"model": {"path": str(R.STORIES)}, "options": {"priority": p, "evaluate": False},  # noqa: E731
                          "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
        t0 = time.monotonic()

        def submit(i: int) -> str:
            with httpx.Client(base_url=base, timeout=30) as c:
                r = c.post("/v1/jobs", json=body(i % 10), headers={"Authorization": f"Bearer {keys[i % len(keys)]}"})
                r.raise_for_status()
                return r.json()["id"]

        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(submit, range(args.jobs)))
        submit_s = time.monotonic() - t0
        worker = subprocess.Popen([sys.executable, "-P", "-c", "from qaas.cli import main; main()", "worker"], env=env,
                                  stdout=open(data / "worker.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        t1 = time.monotonic()
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            while True:
                left = conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued','running')").fetchone()[0]
                if left == 0:
                    break
                if time.monotonic() - t1 > 3600:
                    raise TimeoutError(f"{left} jobs left")
                time.sleep(2)
            drain_s = time.monotonic() - t1
            rows = conn.execute("SELECT id, priority, created_at, status, attempt FROM jobs").fetchall()
            starts = conn.execute("SELECT job_id FROM job_events WHERE kind = 'status' AND message LIKE 'running on %%' "
                                  "ORDER BY id").fetchall()
    finally:
        for p in (worker, api):
            if p is not None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
        with psycopg.connect(R.PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    by_id = {str(r[0]): r for r in rows}
    order = [str(s[0]) for s in starts]
    expected = sorted(by_id, key=lambda i: (-by_id[i][1], by_id[i][2]))
    pairs = [(a, b) for a, b in zip(order, order[1:]) if (-by_id[a][1], by_id[a][2]) > (-by_id[b][1], by_id[b][2])]
    inversions = len(pairs)
    # an inversion between jobs of one priority submitted at the same moment by concurrent clients follows the
    # broker's arrival order (commit, then publish); how far apart in age are the inverted pairs?
    gaps_ms = [abs((by_id[a][2] - by_id[b][2]).total_seconds()) * 1000 for a, b in pairs if by_id[a][1] == by_id[b][1]]
    cross_priority = sum(1 for a, b in pairs if by_id[a][1] != by_id[b][1])
    result = {
        "jobs": args.jobs, "submitted_over_http_s": round(submit_s, 1), "drain_s": round(drain_s, 1),
        "jobs_per_s": round(args.jobs / drain_s, 2),
        "succeeded": sum(1 for r in rows if r[3] == "succeeded"), "not_succeeded": sum(1 for r in rows if r[3] != "succeeded"),
        "lost": len(set(ids) - set(by_id)), "started_more_than_once": len(order) - len(set(order)),
        "attempts_gt_1": sum(1 for r in rows if r[4] != 1),
        "claim_order_equals_priority_then_age": order == expected, "order_inversions": inversions,
        "inversions_across_priorities": cross_priority,
        "max_age_gap_of_inverted_same_priority_pairs_ms": round(max(gaps_ms), 1) if gaps_ms else 0.0,
        "engine": "fake (QAAS_FAKE_ENGINE=1, test-only: a real child process per job, no quantization)",
        "machine": R.machine(), "command": "python -P bench/load/drain.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(json.dumps(result, indent=2))
    R.RESULTS.mkdir(parents=True, exist_ok=True)
    (R.RESULTS / "load-drain.json").write_text(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and result["started_more_than_once"] == 0 and result["not_succeeded"] == 0 else 1


def R_wait(base: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("API did not start")


if __name__ == "__main__":
    sys.exit(main())
