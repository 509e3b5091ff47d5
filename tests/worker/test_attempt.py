"""One attempt of one job (`qaas.worker.attempt`), in-process on the real PostgreSQL and Redis, with a real
engine child: the test-only fake engine, or a small script the test writes when it needs an engine that
misbehaves in a particular way. No Celery worker runs: the test calls what the task calls.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
import uuid

import pytest
import redis
from conftest import STORIES, make_settings
from sqlalchemy import select

from qaas import job_store
from qaas.db.models import HubCredential, Job, JobEvent, JobStatus
from qaas.db.session import session_scope
from qaas.queue import RUN_JOB_TASK
from qaas.security import encrypt_secret
from qaas.worker import attempt
from qaas.worker.child import start_child

pytestmark = pytest.mark.timeout(120)

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": ["some text"]}


def _job(settings, *, qc=NF4, options=None, max_attempts=3, owner="alice", **request) -> uuid.UUID:
    body = {"model": {"path": str(STORIES)}, "quantization_config": qc, "options": options or {}, **request}
    with session_scope(settings.database) as s:
        return job_store.create_job(s, owner=owner, request=body, request_hash="h", idempotency_key=None,
                                    method=qc["quant_method"], bits=4, source_model=str(STORIES), priority=2,
                                    max_attempts=max_attempts).id


def _row(settings, job_id) -> Job:
    with session_scope(settings.database) as s:
        return s.get(Job, job_id)


def _events(settings, job_id) -> list[JobEvent]:
    with session_scope(settings.database) as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_build_spec_names_the_source_the_method_and_the_service_options(settings):
    out = settings.work_dir / "out"
    spec = attempt.build_spec(settings, {"model": {"id": "org/m", "revision": "r1"}, "quantization_config": GPTQ,
                                         "options": {"calibration_samples": 16, "evaluate": False}}, out)
    assert spec["source"] == {"id": "org/m", "revision": "r1"} and spec["out_dir"] == str(out)
    assert spec["quantization_config"] == {**GPTQ, "nsamples": 16}  # the request itself is not changed
    assert spec["options"]["evaluate"] is False and spec["options"]["eval_max_windows"] == settings.eval_max_windows
    assert spec["options"]["allowed_roots"] == [str(p) for p in settings.model_roots]
    local = attempt.build_spec(settings, {"model": {"path": "/models/m"}, "quantization_config": NF4}, out)
    assert local["source"] == {"path": "/models/m"} and "nsamples" not in local["quantization_config"]
    assert local["options"]["evaluate"] is True
    assert attempt.build_spec(settings, {"model": {"path": "/m"}, "quantization_config": GPTQ}, out)[
        "quantization_config"]["nsamples"] == 128
    awq = {"quant_method": "awq", "dataset": ["some text"]}  # AWQ calibrates too: the same service option
    assert attempt.build_spec(settings, {"model": {"path": "/m"}, "quantization_config": awq,
                                         "options": {"calibration_samples": 32}}, out)["quantization_config"][
        "nsamples"] == 32


def test_an_attempt_runs_the_engine_to_a_verdict_and_a_second_message_finds_nothing(tmp_path, clean_db, redis_db):
    # steps of 50 ms: the engine lives long enough for the supervisor to read its memory high-water mark
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, fake_engine=True,
                             fake_engine_step_s=0.05)
    job_id = _job(settings)
    assert attempt.run_attempt(settings, job_id) == "succeeded"
    job = _row(settings, job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.progress == 1.0 and job.hf_token_encrypted is None
    assert {"resolve", "load", "quantize", "export"} <= set(job.timings)
    assert job.result["resources"]["peak_rss_bytes"] > 0 and "out_dir" not in job.result
    assert sorted(f["name"] for f in job.result["files"]) == ["config.json", "model.safetensors"]
    assert (settings.artifacts_dir / str(job_id) / "model.safetensors").is_file()
    assert not (settings.work_dir / str(job_id) / "attempt-1").exists()
    kinds = [(e.kind, e.stage) for e in _events(settings, job_id)]
    assert ("stage", "quantize") in kinds and ("progress", "quantize") in kinds
    assert kinds[-1] == ("status", None)
    assert attempt.run_attempt(settings, job_id) == "duplicate"  # a redelivered message changes nothing
    assert _row(settings, job_id).attempt == 1


def _script_engine(tmp_path, monkeypatch, body: str) -> None:
    """Make attempts start `body` (a Python script) as their engine instead of the real one."""
    lib = tmp_path / "engine-lib"
    lib.mkdir()
    (lib / "scripted_engine.py").write_text(textwrap.dedent(body))

    def start(spec, **kw):
        kw["env_extra"] = {**kw["env_extra"], "PYTHONPATH": str(lib)}
        return start_child(spec, **{**kw, "module": "scripted_engine"})

    monkeypatch.setattr(attempt, "start_child", start)


def _gpu_messages(settings) -> list[tuple[str, str]]:
    """(task, job id) of every message in the GPU queue, over all its priority lists."""
    r = redis.Redis.from_url(settings.broker_url)
    messages = [json.loads(m) for key in r.keys(settings.gpu_queue + "*") for m in r.lrange(key, 0, -1)]
    return [(m["headers"]["task"], m["headers"]["argsrepr"].strip("[]'")) for m in messages]


CRASHING_ENGINE = """
    import json, os, signal, sys
    json.loads(sys.stdin.read())
    print(json.dumps({"type": "stage", "stage": "quantize", "message": "quantizing"}), flush=True)
    token = os.environ.get("QAAS_CHILD_HF_TOKEN")
    print(json.dumps({"type": "log", "message": f"token={token}"}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies without a verdict, as an out-of-memory kill would
"""


def test_an_engine_that_dies_is_retried_then_failed_and_the_saved_token_reaches_it_but_not_the_database(
        settings, tmp_path, monkeypatch):
    _script_engine(tmp_path, monkeypatch, CRASHING_ENGINE)
    token = "hf_saved_token_of_alice_0123456789"
    with session_scope(settings.database) as s:
        s.add(HubCredential(owner="alice", token_encrypted=encrypt_secret(token, settings.secret_key.get_secret_value())))
    job_id = _job(settings, max_attempts=2)

    assert attempt.run_attempt(settings, job_id) == "requeued"
    job = _row(settings, job_id)
    assert (job.status, job.attempt, job.worker, job.stage) == ("queued", 1, None, None)
    assert job.dispatched_at is not None  # sent again at once, at the job's priority
    assert _gpu_messages(settings) == [(RUN_JOB_TASK, str(job_id))]
    logs = [e.message for e in _events(settings, job_id) if e.kind == "log"]
    assert "token=***" in logs and not any(token in (m or "") for m in logs)

    assert attempt.run_attempt(settings, job_id) == "failed"  # attempts ran out
    job = _row(settings, job_id)
    assert job.status == "failed" and job.attempt == 2 and job.error["code"] == "engine_crashed"
    assert job.error["stage"] == "quantize" and "exit status -9" in job.error["message"]
    assert token not in json.dumps(job.error)


def test_progress_is_thinned_but_stages_final_counts_metrics_and_errors_always_land(settings):
    job_id = _job(settings)
    with session_scope(settings.database) as s:
        claimed = job_store.claim(s, job_id, worker="w", lease_s=30)
    state = attempt._State()
    token = "hf_job_token_0123456789abcdef"

    def handle(event: dict) -> None:
        attempt._handle_event(settings.database, job_id, claimed.attempt, state, event, token)

    handle({"type": "stage", "stage": "quantize", "message": f"using {token}"})
    for done in range(1, 5):  # four in a burst: the first lands, the rest are thinned out...
        handle({"type": "progress", "done": done, "total": 5})
    handle({"type": "progress", "done": 5, "total": 5})  # ...but the last one of a stage always lands
    handle({"type": "progress", "done": 5, "total": 9, "metrics": {"layer": "q_proj", "error": 0.1}})
    handle({"type": "error", "code": "x" * 100, "message": f"failed with {token}", "field": "bits"})
    progress = [e for e in _events(settings, job_id) if e.kind == "progress"]
    assert [e.data["done"] for e in progress] == [1, 5, 5] and progress[-1].data["metrics"]["layer"] == "q_proj"
    stage = [e for e in _events(settings, job_id) if e.kind == "stage"][0]
    assert stage.message == "using ***"
    job = _row(settings, job_id)
    assert job.stage == "quantize" and job.progress == 5 / 9
    assert state.error == {"code": "x" * 64, "message": "failed with ***", "stage": "quantize", "field": "bits"}


def test_cancelling_a_running_attempt_stops_the_engine_and_removes_its_output(tmp_path, clean_db, redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, fake_engine=True,
                             fake_engine_step_s=0.3)
    job_id = _job(settings)
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(attempt.run_attempt(settings, job_id)))
    runner.start()
    deadline = time.monotonic() + 60
    while _row(settings, job_id).stage != "quantize" and time.monotonic() < deadline:
        time.sleep(0.1)
    with session_scope(settings.database) as s:
        job_store.request_cancel(s, s.get(Job, job_id))
    runner.join(60)
    assert outcome == ["cancelled"]
    job = _row(settings, job_id)
    assert job.status == JobStatus.cancelled.value and job.cancel_requested
    assert not (settings.artifacts_dir / str(job_id)).exists() and not (settings.work_dir / str(job_id) / "attempt-1").exists()


LINGERING_ENGINE = """
    import json, os, sys, time
    from pathlib import Path
    spec = json.loads(sys.stdin.read())
    out = Path(spec["out_dir"])
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    result = {"files": [{"name": "config.json", "size": 2}], "out_dir": str(out)}
    print(json.dumps({"type": "result", "result": result}), flush=True)
    os.close(1)  # the output stream ends here...
    time.sleep(6)  # ...but the process takes longer than two leases to go (a slow interpreter shutdown)
"""


def test_the_lease_is_kept_while_an_engine_that_has_answered_takes_its_time_to_exit(
        tmp_path, clean_db, redis_db, monkeypatch):
    from qaas.worker.sweeper import sweep_once

    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, lease_s=2.5,
                             heartbeat_interval_s=0.2)
    _script_engine(tmp_path, monkeypatch, LINGERING_ENGINE)
    job_id = _job(settings)
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(attempt.run_attempt(settings, job_id)))
    runner.start()
    while runner.is_alive():  # a sweeper re-queues any running job whose lease lapses
        sweep_once(settings)
        time.sleep(0.2)
    assert outcome == ["succeeded"]
    job = _row(settings, job_id)
    assert job.status == "succeeded" and job.attempt == 1
