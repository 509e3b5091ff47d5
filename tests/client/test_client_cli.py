"""The terminal client (`qaas submit/jobs/status/cancel`) as a user runs it: a subprocess talking to
the real API process, with a real Celery worker, Redis and PostgreSQL behind it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
from conftest import ARTIFACTS, STORIES, auth, fresh_redis_url, new_key, running_service, truncate_all

from support.processes import QAAS, free_port

pytestmark = pytest.mark.slow

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "float32"}


@pytest.fixture(scope="module")
def live(pg_url, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    try:
        with running_service(tmp, "client", database_url=pg_url, broker_url=fresh_redis_url()) as (settings, stack, url):
            yield type("Live", (), {"url": url, "tmp": tmp, "key": new_key(settings, "alice"), "stack": stack,
                                    "settings": settings})
    finally:
        truncate_all(pg_url)


def qaas(live, *args: str, key: str | None = "default", url: str | None = None, env: dict | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess:
    home = live.tmp / "home"
    home.mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    e.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONUNBUFFERED": "1",
              "QAAS_URL": url or live.url})
    if key == "default":
        e["QAAS_API_KEY"] = live.key
    elif key is not None:
        e["QAAS_API_KEY"] = key
    e.update(env or {})
    p = subprocess.run([*QAAS, *args], env=e, capture_output=True, text=True, timeout=timeout, cwd=live.tmp)
    (ARTIFACTS / "client").mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "client" / "transcript.txt", "a") as f:
        f.write(f"$ qaas {' '.join(args)}\n--- exit {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n{p.stderr}\n")
    return p


def _config(live, name: str, body: dict) -> str:
    path = live.tmp / name
    path.write_text(json.dumps(body))
    return str(path)


def test_submit_follow_shows_progress_and_exits_0_on_success(live):
    p = qaas(live, "submit", str(STORIES), "--config", _config(live, "nf4.json", NF4), "--follow")
    assert p.returncode == 0, p.stderr + p.stdout
    err = p.stderr
    for stage in ("resolve", "load", "quantize", "evaluate", "export"):
        assert f"[{stage}] started" in err, err
    assert "%" in err and "/" in err  # progress lines: "[quantize] 5/5 100% block 5/5 ..."
    assert "succeeded" in err
    out = p.stdout
    assert "status    succeeded" in out and "perplexity" in out and "smaller" in out and "model.safetensors" in out
    jid = out.split("job", 1)[1].split()[0]

    listing = qaas(live, "jobs")
    assert listing.returncode == 0 and jid in listing.stdout and "succeeded" in listing.stdout
    shown = qaas(live, "status", jid, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    followed = qaas(live, "status", jid, "--follow")
    assert followed.returncode == 0


def test_failed_job_exits_1_with_its_error(live):
    bad = live.tmp / "pickle-model"
    bad.mkdir(exist_ok=True)
    shutil.copy(STORIES / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    p = qaas(live, "submit", str(bad), "--config", _config(live, "nf4.json", NF4), "--follow")
    assert p.returncode == 1, p.stderr
    assert "failed in stage resolve (source_rejected)" in p.stderr, p.stderr


def test_cancel_a_running_job(live):
    body = {"quantization_config": NF4, "options": {"eval_max_windows": 400}}
    p = qaas(live, "submit", str(STORIES), "--config", _config(live, "long.json", body))
    assert p.returncode == 0
    jid = p.stdout.strip()
    with httpx.Client(base_url=live.url, headers=auth(live.key)) as c:
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{jid}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    c = qaas(live, "cancel", jid)
    assert c.returncode == 0 and "cancel" in c.stderr
    f = qaas(live, "status", jid, "--follow", timeout=90)
    assert f.returncode == 1 and "was cancelled" in f.stderr, f.stderr
    again = qaas(live, "cancel", jid)
    assert again.returncode == 1 and "already finished" in again.stderr


def test_bad_key_unreachable_service_and_invalid_requests(live):
    p = qaas(live, "jobs", key="qaas_not-a-real-key")
    assert p.returncode == 3 and "authentication failed" in p.stderr and "qaas_not-a-real-key" not in p.stderr
    p = qaas(live, "submit", str(STORIES), "--config", _config(live, "nf4.json", NF4), "--follow", key="qaas_nope")
    assert p.returncode == 3 and "authentication failed" in p.stderr
    p = qaas(live, "jobs", key=None)
    assert p.returncode == 3 and "no API key" in p.stderr
    p = qaas(live, "jobs", url=f"http://127.0.0.1:{free_port()}")
    assert p.returncode == 4 and "cannot reach the service" in p.stderr
    # the API's validation message, naming the field
    p = qaas(live, "submit", str(STORIES), "--config", _config(live, "bad.json", {**NF4, "bits": 3}))
    assert p.returncode == 2 and "quantization_config.bits" in p.stderr, p.stderr
    p = qaas(live, "submit", str(STORIES), "--config", str(live.tmp / "missing.json"))
    assert p.returncode == 2 and "cannot read" in p.stderr
    p = qaas(live, "status", "00000000-0000-0000-0000-000000000000")
    assert p.returncode == 2 and "no such job" in p.stderr
    p = qaas(live, "submit")
    assert p.returncode == 2  # argparse usage error


def test_url_and_key_from_the_config_file(live):
    cfg = live.tmp / "home" / ".config" / "qaas"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "client.toml").write_text(f'url = "{live.url}"\napi_key = "{live.key}"\n')
    try:
        home = live.tmp / "home"
        e = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
        e.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
        p = subprocess.run([*QAAS, "jobs"], env=e, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        (cfg / "client.toml").unlink()


def _job_in_state(live, status: str) -> str:
    """A job of alice's brought straight to `status` in the database (never sent to the worker)."""
    from qaas import job_store
    from qaas.db.models import JobStatus
    from qaas.db.session import session_scope

    with session_scope(live.settings.resolved_database_url) as s:
        job = job_store.create_job(s, owner="alice", request={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                                   request_hash="h", idempotency_key=None, method="bitsandbytes", bits=4,
                                   source_model=str(STORIES), priority=0, max_attempts=1)
        if status == "queued":
            # marked as sent: the sweeper leaves it alone for QAAS_REDISPATCH_AFTER_S (30 s), so the worker
            # does not take it in the meantime
            job_store.mark_dispatched(s, job.id)
            return str(job.id)
        job = job_store.claim(s, job.id, worker="test-worker", lease_s=600)
        if status != "running":
            error = {"code": "oom", "message": "out of memory", "stage": "quantize"} if status == "failed" else None
            assert job_store.finish(s, job.id, job.attempt, JobStatus(status), error=error,
                                    result={"files": []} if status == "succeeded" else None)
        return str(job.id)


def _server_answering(status: int):
    """An HTTP server on loopback that answers every request with `status` (a broken service)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b'{"title": "Internal Server Error", "status": %d}' % status
            self.send_response(status)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_every_command_keeps_the_documented_exit_codes(live):
    """README: 0 succeeded, 1 job failed/cancelled, 2 usage, 3 auth, 4 unreachable -- for every client command."""
    queued = _job_in_state(live, "queued")  # first: within the 30 s before the sweeper would send it
    for args, code in [(("status", queued), 0), (("cancel", queued), 0), (("status", queued), 1)]:
        p = qaas(live, *args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
    jobs = {s: _job_in_state(live, s) for s in ("running", "succeeded", "failed", "cancelled")}
    config = _config(live, "nf4.json", NF4)
    by_job_state = [
        (("status", jobs["succeeded"]), 0), (("status", jobs["running"]), 0),
        (("status", jobs["failed"]), 1), (("status", jobs["cancelled"]), 1),
        (("status", jobs["failed"], "--json"), 1), (("status", jobs["failed"], "--follow"), 1),
        (("status", jobs["succeeded"], "--follow"), 0), (("cancel", jobs["succeeded"]), 1),
        (("jobs",), 0), (("jobs", "--status", "failed"), 0),
    ]
    for args, code in by_job_state:
        p = qaas(live, *args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
    assert "failed in stage quantize (oom)" in qaas(live, "status", jobs["failed"]).stderr

    every_command = [("submit", str(STORIES), "--config", config), ("jobs",), ("status", jobs["succeeded"]),
                     ("cancel", jobs["running"])]
    broken = _server_answering(500)
    try:
        for args in every_command:
            assert qaas(live, *args, key="qaas_not-a-real-key").returncode == 3, args  # refused key
            assert qaas(live, *args, key=None).returncode == 3, args  # no key at all
            assert qaas(live, *args, url=f"http://127.0.0.1:{free_port()}").returncode == 4, args  # nothing there
            p = qaas(live, *args, url=f"http://127.0.0.1:{broken.server_address[1]}")  # a server error
            assert p.returncode == 4 and "answered 500" in p.stderr, (args, p.stderr)
            assert qaas(live, *args, "--no-such-option").returncode == 2, args
    finally:
        broken.shutdown()
    for args in [("submit", str(STORIES)), ("status",), ("cancel",), ("jobs", "--status", "bogus"),
                 ("jobs", "--limit", "0"), ("status", "not-a-job-id"), ("cancel", "00000000-0000-0000-0000-000000000000"),
                 ("submit", str(STORIES), "--config", _config(live, "bad.json", {**NF4, "bits": 3}))]:
        assert qaas(live, *args).returncode == 2, args
    assert qaas(live, "status", jobs["running"]).returncode == 0  # untouched by the refused cancels
