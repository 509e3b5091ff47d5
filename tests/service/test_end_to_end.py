"""The real stack: API process + Celery worker process + Redis + PostgreSQL, over HTTP.

Nothing runs in eager mode: the worker is a subprocess consuming a real Redis queue, and the
quantized output is loaded back with transformers + bitsandbytes and generates text.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from conftest import ARTIFACTS, STORIES, auth, new_key, settings_env
from sqlalchemy import select

from qaas.db.models import Job, JobEvent
from qaas.db.session import session_scope
from qaas.queue import send_run_job
from support.processes import Stack, wait_for_log, wait_job

pytestmark = pytest.mark.slow

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "float32"}


@pytest.fixture
def stack(settings, tmp_path):
    s = Stack(tmp_path, settings_env(settings))
    yield s
    s.stop_all()
    s.save_logs(ARTIFACTS, tmp_path.name)


def test_nf4_job_through_the_real_stack_loads_in_transformers(stack, settings, tmp_path):
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        # cpu_compatible: the export must run on this CPU (bitsandbytes' CPU kernels reject stories' 172 width)
        r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                     "options": {"cpu_compatible": True}})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", (job, worker.log()[-4000:])
        assert job["attempt"] == 1 and job["worker"]
        assert job["result"]["bitsandbytes"]["runs_on"]["devices"] == ["cuda", "cpu"]  # the option reached the engine
        names = {f["name"]: f for f in job["files"]}
        assert {"config.json", "model.safetensors"} <= set(names)
        assert set(job["timings"]) >= {"resolve", "load", "quantize", "export"}
        events = c.get(f"/v1/jobs/{jid}/events").json()["items"]
        stages = [e["stage"] for e in events if e["kind"] == "stage"]
        assert stages[:2] == ["resolve", "load"] and "quantize" in stages and "export" in stages
        assert any(e["kind"] == "progress" for e in events)
        out = tmp_path / "downloaded"
        out.mkdir()
        for name in names:
            resp = c.get(f"/v1/jobs/{jid}/files/{name}")
            assert resp.status_code == 200
            (out / name).write_bytes(resp.content)
            assert len(resp.content) == names[name]["size"]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.load_in_4bit
    tok = AutoTokenizer.from_pretrained(out)
    ids = model.generate(torch.tensor([[tok.bos_token_id]]), max_new_tokens=12, do_sample=False)
    text = tok.decode(ids[0], skip_special_tokens=True)
    assert len(text.split()) >= 3, text


def test_duplicate_delivery_runs_the_job_once(stack, settings):
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    from fastapi.testclient import TestClient

    from qaas.api.app import create_app

    with TestClient(create_app(settings)) as c:
        jid = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                       "options": {"evaluate": False}}, headers=auth(key)).json()["id"]
        # the same message twice more, as a broker redelivery would
        assert send_run_job(settings, uuid.UUID(jid)) and send_run_job(settings, uuid.UUID(jid))
        c.headers.update(auth(key))
        job = wait_job(c, jid, {"succeeded", "failed"})
        assert job["status"] == "succeeded" and job["attempt"] == 1
        time.sleep(2)  # give the duplicates time to be consumed
        wait_for_log(worker, "nothing to claim", timeout=30)
    with session_scope(settings.resolved_database_url) as s:
        running = s.scalars(select(JobEvent).where(JobEvent.job_id == uuid.UUID(jid), JobEvent.kind == "status")).all()
        assert sum(1 for e in running if (e.data or {}).get("status") == "running") == 1
        assert s.get(Job, uuid.UUID(jid)).attempt == 1


def test_cancel_reaches_a_running_job(stack, settings):
    stack.start_worker()
    _, url = stack.start_api()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        # evaluation on many windows keeps the job busy long enough to cancel it mid-run
        jid = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                       "options": {"eval_max_windows": 400}}).json()["id"]
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{jid}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        r = c.post(f"/v1/jobs/{jid}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        job = wait_job(c, jid, {"cancelled", "succeeded", "failed"}, timeout=60)
        assert job["status"] == "cancelled", job
        assert not (settings.artifacts_dir / jid).exists()
        assert not (settings.work_dir / jid / "attempt-1").exists()


def test_engine_error_fails_the_job_with_a_clear_reason(stack, settings, tmp_path):
    """A pickle-only checkpoint is refused by the engine; the job fails with its stage and code."""
    import json
    import shutil

    bad = tmp_path / "pickle-model"
    bad.mkdir()
    shutil.copy(STORIES / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    stack.start_worker()
    _, url = stack.start_api()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        jid = c.post("/v1/jobs", json={"model": {"path": str(bad)}, "quantization_config": NF4}).json()["id"]
        job = wait_job(c, jid, {"succeeded", "failed"})
    assert job["status"] == "failed" and job["attempt"] == 1
    assert job["error"]["code"] == "source_rejected" and job["error"]["stage"] == "resolve"
    assert "safetensors" in job["error"]["message"] or "pickle" in job["error"]["message"].lower(), json.dumps(job["error"])
