"""Smoke run of an installed qaas (scripts/install-smoke.sh runs it in a fresh venv; no pytest there).

With the interpreter of that venv and nothing of the checkout on sys.path: a new PostgreSQL database,
`qaas migrate`, a key, `qaas api` and `qaas worker` on PostgreSQL and Redis, one GPTQ job on stories260K
to `succeeded`, its status (the API's async database path), events and a downloaded file, and the
dashboard's pages (templates and static files inside the wheel). Exits non-zero, with the service's
logs, on any failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("QAAS_TEST_ASSETS", REPO.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
PG_ADMIN_URL = os.environ.get("QAAS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
QAAS = [str(Path(sys.executable).with_name("qaas"))]  # the console script the wheel installed
# Distinct sentences, comfortably above the engine's 256-token calibration minimum for stories260K's tokenizer.
CALIBRATION = [
    "Once upon a time there was a little girl named Lily. She loved to play outside in the sun with her friends.",
    "The dog ran to the park and found a big red ball under the old tree. He wagged his tail and barked.",
    "Tom had a small boat. Every day he sailed it on the pond near his house and watched the ducks swim by.",
    "One day, a bird flew into the garden. It was hungry, so Mia gave it some bread and it sang a happy song.",
    "Ben wanted to bake a cake for his mom. He mixed flour, eggs and sugar, and put it in the hot oven.",
    "The sky was dark and the rain fell hard. Sara and her brother stayed inside and built a fort of pillows.",
    "A little cat lived in a big house. She liked to sleep on the soft bed and chase the shiny toy mouse.",
    "Max found a shiny key in the sand. He looked for the box it could open and found it under a rock.",
] * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, timeout: float, procs: list[subprocess.Popen]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args[1]} exited with {p.returncode}")
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def main() -> int:
    import qaas

    assert not str(Path(qaas.__file__).resolve()).startswith(str(REPO)), f"qaas imported from the checkout: {qaas.__file__}"
    work = Path(tempfile.mkdtemp(prefix="qaas-smoke-"))
    db = f"qaas_smoke_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    queue = f"smoke-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update({
        "QAAS_DATABASE_URL": f"{base}/{db}", "QAAS_BROKER_URL": f"{REDIS_URL}/0", "QAAS_DATA_DIR": str(work / "data"),
        "QAAS_LOCAL_MODEL_ROOTS": str(ASSETS), "QAAS_DEVICE": "cpu", "QAAS_GPU_QUEUE": f"{queue}-gpu",
        "QAAS_IO_QUEUE": f"{queue}-io", "PYTHONUNBUFFERED": "1",
    })
    procs: list[subprocess.Popen] = []
    logs = {name: work / f"{name}.log" for name in ("api", "worker")}
    try:
        subprocess.run([*QAAS, "migrate"], env=env, check=True, capture_output=True, timeout=120)
        key = subprocess.run([*QAAS, "keys", "create", "smoke"], env=env, check=True, capture_output=True, text=True,
                             timeout=60).stdout.strip()
        port = free_port()
        for name, args in (("api", ["api", "--port", str(port)]), ("worker", ["worker"])):
            with open(logs[name], "wb") as log:
                procs.append(subprocess.Popen([*QAAS, *args], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            wait_until("API ready", lambda: c.get("/readyz").status_code == 200, 90, procs)
            wait_until("worker ready", lambda: "ready" in logs["worker"].read_text(errors="replace"), 120, procs)
            r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": {
                "quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": CALIBRATION}})
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            job = wait_until("job finished", lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in
                             ("succeeded", "failed", "cancelled") and j, 600, procs)
            assert job["status"] == "succeeded", job
            events = c.get(f"/v1/jobs/{job_id}/events").json()
            assert events, "no events"
            names = {f["name"] for f in job["result"]["files"]}
            assert "model.safetensors" in names, names
            download = c.get(f"/v1/jobs/{job_id}/files/config.json")
            assert download.status_code == 200 and download.json()["quantization_config"]["bits"] == 4
            for page in ("/dashboard/login", "/docs"):
                assert c.get(page).status_code == 200, page
            css = c.get("/dashboard/static/dashboard.css")
            assert css.status_code == 200 and css.text.strip(), "dashboard.css missing from the wheel"
        print(f"install smoke: job {job_id} succeeded on {url} (PostgreSQL {db}, Redis)", file=sys.stderr)
        return 0
    except Exception:
        for name, path in logs.items():
            if path.exists():
                print(f"--- {name} log (last 60 lines) ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-60:]),
                      file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
