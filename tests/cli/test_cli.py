"""The `qaas` command: keys, migrate, in-process quantize, and the one-command embedded service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from conftest import ASSETS, STORIES, WIKITEXT, auth

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
        wait_http(url + "/healthz", timeout=60)
        key = out_path.read_text().strip().splitlines()[0]
        assert key.startswith("qaas_")
        assert f"qaas is starting at {url}" in err_path.read_text()
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
