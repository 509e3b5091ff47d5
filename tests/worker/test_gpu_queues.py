"""Several GPUs for one job, the service's side: `options.gpus` bounded by QAAS_MAX_GPUS_PER_JOB (a 422 naming
the field), one queue per GPU count (the API, the sweeper and a retry send a job to the queue of its size), and
a worker that holds another count of GPUs leaving the job unclaimed for a worker of its size. Real PostgreSQL
and Redis; no Celery worker runs (the test calls what the task calls)."""

from __future__ import annotations

import json
import uuid

import redis
from conftest import STORIES, auth, make_settings, new_key
from fastapi.testclient import TestClient

from qaas import job_store
from qaas.api.app import create_app
from qaas.db.models import Job
from qaas.db.session import session_scope
from qaas.queue import gpu_queue_name
from qaas.worker import attempt
from qaas.worker.sweeper import sweep_once

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": ["a calibration text " * 40]}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _body(qc=GPTQ, **options):
    return {"model": {"path": str(STORIES)}, "quantization_config": qc, "options": options}


def _queued_ids(settings, queue: str) -> list[str]:
    """Job ids of the run messages in one queue (all its priority lists; kombu names them "<queue>\\x06\\x16<p>")."""
    r = redis.Redis.from_url(settings.broker_url)
    keys = [k for k in r.keys(queue + "*") if k.decode() == queue or k.decode().startswith(queue + "\x06\x16")]
    return [json.loads(__import__("base64").b64decode(json.loads(m)["body"]))[0][0]
            for k in keys for m in r.lrange(k, 0, -1)]


def _problem_fields(r) -> list[str]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return [e["field"] for e in r.json()["errors"]]


def test_options_gpus_is_bounded_by_the_operator_and_the_method(tmp_path, clean_db, redis_db):
    one = make_settings(tmp_path / "one", database_url=clean_db, broker_url=redis_db)  # QAAS_MAX_GPUS_PER_JOB=1
    with TestClient(create_app(one)) as c:
        key = auth(new_key(one, "alice"))
        r = c.post("/v1/jobs", json=_body(gpus=2), headers=key)
        assert "options.gpus" in _problem_fields(r) and "QAAS_MAX_GPUS_PER_JOB" in r.text
        assert "options.gpus" in _problem_fields(c.post("/v1/jobs", json=_body(gpus=0), headers=key))
        assert c.post("/v1/jobs", json=_body(gpus=1), headers=key).status_code == 202
    four = make_settings(tmp_path / "four", database_url=clean_db, broker_url=redis_db, max_gpus_per_job=4)
    with TestClient(create_app(four)) as c:
        key = auth(new_key(four, "bob"))
        assert "options.gpus" in _problem_fields(c.post("/v1/jobs", json=_body(gpus=8), headers=key))
        assert "options.gpus" in _problem_fields(c.post("/v1/jobs", json=_body(NF4, gpus=2), headers=key))
        finetune = {"kind": "finetune", "model": {"path": str(STORIES)}, "dataset": ["a text"], "options": {"gpus": 2}}
        assert "options.gpus" in _problem_fields(c.post("/v1/jobs", json=finetune, headers=key))
        r = c.post("/v1/jobs", json=_body(gpus=4), headers=key)
        assert r.status_code == 202, r.text
        assert r.json()["request"]["options"]["gpus"] == 4
        # the message is in the 4-GPU queue, not the one-GPU queue
        assert _queued_ids(four, gpu_queue_name(four, 4)) == [r.json()["id"]]
        assert _queued_ids(four, four.gpu_queue) == []


def _job(settings, gpus: int) -> uuid.UUID:
    with session_scope(settings.database) as s:
        return job_store.create_job(s, owner="alice", request=_body(gpus=gpus), request_hash="h", idempotency_key=None,
                                    method="gptq", bits=4, source_model=str(STORIES), priority=0,
                                    max_attempts=3).id


def test_the_sweeper_and_a_worker_of_another_size_send_a_job_to_the_queue_of_its_gpu_count(tmp_path, clean_db,
                                                                                            redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, max_gpus_per_job=2)
    two, one = _job(settings, 2), _job(settings, 1)
    assert sweep_once(settings)["dispatched"] == 2
    assert _queued_ids(settings, gpu_queue_name(settings, 2)) == [str(two)]
    assert _queued_ids(settings, settings.gpu_queue) == [str(one)]
    # the broker holds both messages: nothing is re-sent
    assert sweep_once(settings)["dispatched"] == 0

    # a one-GPU worker given the two-GPU job's message (its -Q named the wrong queue) leaves it queued and
    # sends it to the two-GPU queue again
    assert attempt.run_attempt(settings, two) == "misrouted"
    with session_scope(settings.database) as s:
        job = s.get(Job, two)
        assert (job.status, job.attempt, job.worker) == ("queued", 0, None)
    assert _queued_ids(settings, gpu_queue_name(settings, 2)) == [str(two), str(two)]
    spec = attempt.build_spec(settings, _body(gpus=2), tmp_path / "out")
    assert spec["options"]["gpus"] == 2
    assert attempt.build_spec(settings, _body(), tmp_path / "out")["options"]["gpus"] == 1
