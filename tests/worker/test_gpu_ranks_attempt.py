"""A job on two GPUs (`options.gpus`: two engine ranks, gloo on the CPU) behaves as a one-GPU job does when a
rank is killed with -9 (the attempt fails as a crash, nothing is written, the job is retried and the retry
succeeds) and when it is cancelled (every rank stops). Real PostgreSQL and Redis, the real engine; no Celery
worker runs (the test calls what the task calls)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ASSETS, STORIES, make_settings
from sqlalchemy import select

from qaas import job_store
from qaas.db.models import Job, JobEvent, JobStatus
from qaas.db.session import session_scope
from qaas.worker import attempt

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A Llama of 8 blocks wide enough (256) that its blocks take a while on two CPU ranks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llama8")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((STORIES / name).read_bytes())
    return d


def _job(settings, source: Path) -> uuid.UUID:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "nsamples": 32, "model_seqlen": 128,
          "dataset": str(ASSETS / "text" / "tinyshakespeare" / "input.txt")}
    body = {"model": {"path": str(source)}, "quantization_config": qc, "options": {"gpus": 2, "evaluate": False}}
    with session_scope(settings.database) as s:
        return job_store.create_job(s, owner="alice", request=body, request_hash="h", idempotency_key=None,
                                    method="gptq", bits=4, source_model=str(source), priority=0, max_attempts=2).id


def _settings(tmp_path, clean_db, redis_db, source: Path):
    return make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, device="cpu", worker_gpus=2,
                         max_gpus_per_job=2, local_model_roots=f"{ASSETS},{source.parent}")


def _row(settings, job_id) -> Job:
    with session_scope(settings.database) as s:
        return s.get(Job, job_id)


def _ranks_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run as an engine rank."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"qaas.worker.engine.ranks" in cmd:
            found.append(int(entry.name))
    return found


def _start(settings, job_id, monkeypatch) -> tuple[threading.Thread, list[str], list]:
    """The attempt on a thread, and the engine child it starts (once started)."""
    children: list = []
    real = attempt.start_child

    def start(spec, **kw):
        child = real(spec, **kw)
        children.append(child)
        return child

    monkeypatch.setattr(attempt, "start_child", start)
    outcome: list[str] = []
    t = threading.Thread(target=lambda: outcome.append(attempt.run_attempt(settings, job_id)))
    t.start()
    return t, outcome, children


def _wait_for_blocks(settings, job_id, children) -> list[int]:
    """The other rank's pid once the job is quantizing its blocks (the first block done)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job = _row(settings, job_id)
        ranks = _ranks_of(children[0].pid) if children else []
        if job.stage == "quantize" and job.progress > 0 and ranks:
            return ranks
        time.sleep(0.05)
    raise AssertionError(f"the job never reached its blocks on two ranks: {_row(settings, job_id).stage}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie is gone too (its parent, the engine, is gone or has not reaped it yet)
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_kill_9_of_one_rank_fails_the_attempt_as_a_crash_and_the_retry_succeeds(tmp_path, clean_db, redis_db,
                                                                                 model_dir, monkeypatch):
    settings = _settings(tmp_path, clean_db, redis_db, model_dir)
    job_id = _job(settings, model_dir)
    t, outcome, children = _start(settings, job_id, monkeypatch)
    [rank1] = _wait_for_blocks(settings, job_id, children)
    os.kill(rank1, signal.SIGKILL)
    t.join(120)
    assert outcome == ["requeued"]
    assert children[0].poll() == 4  # ranks.EXIT_RANK_LOST, and no verdict
    job = _row(settings, job_id)
    assert (job.status, job.attempt) == ("queued", 1)
    assert not (settings.artifacts_dir / str(job_id)).exists()
    assert not (settings.work_dir / str(job_id) / "attempt-1").exists()
    with session_scope(settings.database) as s:
        said = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any("rank 1 of 2 died (signal 9)" in (m or "") for m in said), said

    t, outcome, children = _start(settings, job_id, monkeypatch)
    t.join(240)
    job = _row(settings, job_id)
    assert outcome == ["succeeded"], job.error
    assert job.attempt == 2 and job.result["quantized_modules"] == 8 * 7
    assert (settings.artifacts_dir / str(job_id) / "model.safetensors").is_file()


def test_cancelling_a_two_rank_job_stops_every_rank(tmp_path, clean_db, redis_db, model_dir, monkeypatch):
    settings = _settings(tmp_path, clean_db, redis_db, model_dir)
    job_id = _job(settings, model_dir)
    t, outcome, children = _start(settings, job_id, monkeypatch)
    ranks = _wait_for_blocks(settings, job_id, children)
    with session_scope(settings.database) as s:
        job_store.request_cancel(s, s.get(Job, job_id))
    t.join(120)
    assert outcome == ["cancelled"]
    assert _row(settings, job_id).status == JobStatus.cancelled.value
    assert children[0].poll() == 3  # the runner's cooperative stop
    assert all(_gone(pid) for pid in ranks)
    assert not (settings.artifacts_dir / str(job_id)).exists()
