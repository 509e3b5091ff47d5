"""kill -9 a fine-tuning engine mid-training: the retried attempt resumes from the last adapter checkpoint,
and the adapter is published to the (fake) Hub once, with its model card.

The real engine (no fake) trains stories260K with a checkpoint every 4 steps; once step 9 is reported the
child is killed by PID. Attempt 2 must start from the newest checkpoint (not step 0), log it, and finish with
one loss point per step -- the lost attempt's up to the checkpoint, then its own.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from chaos.helpers import engine_started, events, wait_dead, wait_progress
from conftest import STORIES, auth, make_settings, new_key
from support.hub_fixtures import WRITE_TOKEN
from support.processes import wait_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TEXTS = ["Once upon a time, there was a little girl named Lily. She loved to play outside.",
         "Lily and her dog Max ran to the park. They played with the ball all day."] * 6


def test_killed_training_resumes_from_the_last_checkpoint_and_publishes_the_adapter_once(
        chaos_stack, tmp_path, clean_db, redis_db, fake_hub):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, job_max_attempts=2,
                             hub_endpoint=fake_hub.url)
    stack = chaos_stack(settings)
    _, url = stack.start_api()
    stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        r = c.post("/v1/jobs", json={"kind": "finetune", "model": {"path": str(STORIES)}, "dataset": TEXTS,
                                     "training": {"max_steps": 16, "save_steps": 4, "logging_steps": 1,
                                                  "learning_rate": 3e-3, "max_seq_length": 32,
                                                  "optim": "adamw_torch"},
                                     "hf_token": WRITE_TOKEN, "push_to_hub": {"repo_id": "alice/stories-adapter"}})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        pid = engine_started(c, jid, attempt=1, timeout=180)
        wait_progress(c, jid, "train", 9, timeout=300)
        checkpoints = list((settings.work_dir / jid / "attempt-1" / "checkpoints").glob("step-*"))
        assert checkpoints and all(p.name.startswith("step-") for p in checkpoints), checkpoints  # step 8 at least
        os.kill(pid, signal.SIGKILL)
        wait_dead(pid)

        engine_started(c, jid, attempt=2, timeout=120)
        job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=400)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job["error"]
        result = job["result"]
        # killed at step 9 or a little later (the event is read while training goes on): a checkpoint of
        # step 8 or 12, never a start from 0
        resumed = result["resumed_from_step"]
        assert resumed in (8, 12), resumed
        assert any((e["message"] or "") == f"resumed from the checkpoint of step {resumed}" for e in events(c, jid))
        steps = [s for s, _, _ in result["loss"]["curve"]]
        assert steps == list(range(1, 17)), steps  # each step once: the checkpoint's, then this attempt's
        assert result["loss"]["evals"][0][0] == 0  # the eval before training, carried in the checkpoint
        assert not (settings.work_dir / jid / "attempt-1").exists()

        # published once, by the attempt that finished, with the adapter's card
        from huggingface_hub import ModelCard, hf_hub_download

        assert fake_hub.hub.count("POST", "commit") == 1
        assert job["result"]["hub"]["repo_id"] == "alice/stories-adapter"
        card = ModelCard.load("alice/stories-adapter", token=WRITE_TOKEN)
        assert card.data.library_name == "peft" and "qlora" in card.data.tags
        assert card.data.base_model is None  # a local directory is no Hub model to link to
        assert f"resumed after a lost worker from step | {resumed}" in card.text
        assert result["data"]["dataset_sha256"] in card.text
        hf_hub_download("alice/stories-adapter", "adapter_model.safetensors", token=WRITE_TOKEN)
