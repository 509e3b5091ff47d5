"""The `qaas` command: keys, migrate, in-process quantize, and the one-command embedded service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import ASSETS, REPO, STORIES, WIKITEXT, auth

QAAS = [sys.executable, "-P", "-c", "from qaas.cli import main; main()"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update(extra)
    return env


def test_keys_create_prints_only_the_key_and_migrate_is_idempotent(tmp_path):
    env = _clean_env(QAAS_DATA_DIR=str(tmp_path / "data"))
    for _ in range(2):
        subprocess.run([*QAAS, "migrate"], env=env, check=True, capture_output=True)
    out = subprocess.run([*QAAS, "keys", "create", "ci-bot"], env=env, check=True, capture_output=True, text=True)
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qaas_") and len(lines[0]) > 40
    # the key works against an API on the same database, and is not stored in clear
    db = (tmp_path / "data" / "qaas.db").read_bytes()
    assert lines[0].encode() not in db


def test_production_refuses_unsafe_defaults(tmp_path):
    env = _clean_env(QAAS_ENV="production", QAAS_DATA_DIR=str(tmp_path))
    r = subprocess.run([*QAAS, "migrate"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "QAAS_SECRET_KEY" in r.stderr and "QAAS_DATABASE_URL" in r.stderr


def test_quantize_in_process_writes_a_loadable_model(tmp_path):
    out = tmp_path / "out"
    config = json.dumps({"quant_method": "bitsandbytes", "load_in_8bit": True})
    r = subprocess.run([*QAAS, "quantize", str(STORIES), "--config", config, "--out", str(out), "--no-eval"],
                       env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert {f["name"] for f in result["files"]} >= {"config.json", "model.safetensors"}
    # plain lines when stderr is not a terminal, one per stage
    assert "[load]" in r.stderr and "[quantize]" in r.stderr and "[export]" in r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_8bit"] is True


def test_quantize_rejects_a_bad_config_naming_the_field(tmp_path):
    r = subprocess.run([*QAAS, "quantize", str(STORIES), "--config", '{"quant_method": "gptq", "bits": 5, "dataset": "c4"}',
                        "--out", str(tmp_path / "o")], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "quantization_config.bits" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_qaas_up_embedded_mode_runs_a_job_end_to_end(tmp_path):
    """The README's first command: no Postgres, no Redis, no GPU; SQLite + filesystem broker."""
    from support.processes import free_port, wait_http

    port = free_port()
    env = _clean_env(QAAS_LOCAL_MODEL_ROOTS=str(ASSETS), QAAS_EVAL_TEXT=str(WIKITEXT), QAAS_EVAL_MAX_WINDOWS="2")
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([*QAAS, "up", "--port", str(port)], cwd=tmp_path, env=env, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        key = _wait_for_first_key(out_path, proc)
        assert f"  URL        {url}" in err_path.read_text()
        assert (tmp_path / "qaas-data" / "qaas.db").exists()  # embedded defaults, under the cwd
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
            assert c.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
            r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": {
                "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})
            assert r.status_code == 202, r.text
            jid = r.json()["id"]
            deadline = time.monotonic() + 240
            while (job := c.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
        assert job["status"] == "succeeded", (job, err_path.read_text()[-3000:])
        assert job["result"]["evaluation"]["perplexity_after"] > 0
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # SIGTERM stops the service and the worker it started (uvicorn re-raises the signal after its own
    # shutdown; without qaas' handler the process died before it could stop the worker, leaving it running)
    _assert_gone(workers[0], within_s=35)


def _wait_for_first_key(stdout_path, proc, timeout: float = 180) -> str:
    """`qaas up` prints the first key alone on stdout once the API and the worker are ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = stdout_path.read_text().splitlines()
        if lines:
            assert len(lines) == 1 and KEY.fullmatch(lines[0]), lines
            return lines[0]
        assert proc.poll() is None, f"qaas up exited with {proc.returncode}"
        time.sleep(0.2)
    raise TimeoutError("qaas up printed no key")


KEY = re.compile(r"qaas_[A-Za-z0-9_-]{40,}")


def test_the_first_command_prints_the_url_and_key_last_with_no_warning_above(tmp_path):
    """The README's first command, `./scripts/up.sh` (setup, then `qaas up`): what the terminal shows is
    the summary, ending in the URL and the one-time key; no installer output, no warnings. Everything
    else the service says is in its log file, which holds no warning of the project's making either."""
    from support.processes import free_port

    port = free_port()
    data = tmp_path / "data"
    # the test's own venv stands for .venv: setup.sh finds it installed from these inputs and does nothing
    env = _clean_env(QAAS_LOCAL_MODEL_ROOTS=str(ASSETS), QAAS_DATA_DIR=str(data),
                     QAAS_VENV=str(Path(sys.executable).parent.parent))
    terminal = tmp_path / "terminal.txt"
    with open(terminal, "w") as out:  # stdout and stderr in one stream, in order, as a terminal shows them
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "up.sh"), "--port", str(port)], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(KEY.fullmatch(line) for line in terminal.read_text().splitlines()):
            assert proc.poll() is None, terminal.read_text()
            assert time.monotonic() < deadline, terminal.read_text()
            time.sleep(0.2)
        time.sleep(2)  # anything printed right after the key would show here
        lines = [line for line in terminal.read_text().splitlines() if line.strip()]
        assert KEY.fullmatch(lines[-1]), lines
        assert lines[-2] == "  API key    (the first one, shown once: keep it)", lines
        assert lines[-3] == f"  URL        http://127.0.0.1:{port}", lines
        first = next(i for i, line in enumerate(lines) if line.startswith("qaas is running (embedded: SQLite"))
        assert all(line.startswith("setup: ") for line in lines[:first]), lines  # at most a line per install step
        assert not [line for line in lines if "warn" in line.lower() or "error" in line.lower()], lines
        log = (data / "qaas-up.log").read_text()
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert any(r["logger"] == "celery.apps.worker" and r["msg"].endswith("ready.") for r in records)
        # running as root, Celery says it is not recommended; any other warning would be the project's
        warned = [r for r in records if r["level"] in ("warning", "error", "critical")
                  and not (os.getuid() == 0 and "SecurityWarning: You're running the worker with superuser" in r["msg"])]
        assert not warned, warned
        assert not (tmp_path / "control").exists()  # kombu's exchange tables live under the data dir
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _assert_gone(process, within_s: float) -> None:
    import psutil

    try:
        process.wait(timeout=within_s)
    except psutil.TimeoutExpired:
        process.kill()
        raise AssertionError(f"pid {process.pid} ({process.cmdline()}) outlived `qaas up`")


def test_a_killed_qaas_up_takes_its_worker_with_it(tmp_path):
    from support.processes import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen([*QAAS, "up", "--port", str(port)], cwd=tmp_path, env=_clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 1
    finally:
        proc.kill()  # no clean-up code of its own runs
        proc.wait(timeout=30)
    _assert_gone(workers[0], within_s=10)  # PR_SET_PDEATHSIG
