"""The terminal client knows fine-tuning jobs: a request file with "kind": "finetune", `job:<id>` as the model,
training progress (loss, learning rate, tokens/s) on the bars, and a finished job's loss and adapter."""

from __future__ import annotations

import argparse
import io
import json

from qaas.client_cli import _error_summary, build_submission, describe


def _args(tmp_path, model, config):
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(config))
    return argparse.Namespace(config=str(path), model=model, revision=None, push_to_hub=None, public=False)


def test_a_finetune_request_file_is_sent_whole_and_job_ids_name_a_jobs_output(tmp_path):
    config = {"kind": "finetune", "lora": {"r": 16}, "dataset": ["a text"], "training": {"max_steps": 10}}
    body = build_submission(_args(tmp_path, "job:7f1d0c2e-0000-4000-8000-000000000001", config))
    assert body == {**config, "model": {"job": "7f1d0c2e-0000-4000-8000-000000000001"}}
    body = build_submission(_args(tmp_path, "org/name", config))
    assert body["kind"] == "finetune" and body["model"] == {"id": "org/name"} and "quantization_config" not in body


def test_training_progress_and_a_finished_finetune_job():
    assert _error_summary({"step": 5, "loss": 2.34567, "lr": 2e-4, "tokens_per_s": 1234.5}) == \
        " loss 2.3457 lr 2.0e-04 1234 tok/s"
    assert _error_summary({"step": 0, "eval_loss": 3.5}) == " eval loss 3.5000"
    job = {"id": "j", "status": "succeeded", "model": "org/name", "kind": "finetune", "method": "qlora", "bits": 4,
           "created_at": "2026-12-02T00:00:00Z", "files": [{"name": "adapter_model.safetensors", "size": 2048,
                                                             "url": "/v1/jobs/j/files/adapter_model.safetensors"}],
           "result": {"kind": "finetune", "loss": {"first": 2.5, "last": 1.25}, "training": {"total_steps": 40},
                      "lora": {"r": 16, "trainable_parameters": 46240},
                      "evaluation": {"perplexity_before": 12.0, "perplexity_after": 6.0}}}
    out = io.StringIO()
    describe(job, out)
    text = out.getvalue()
    assert "fine-tuning" in text and "loss      2.5000 -> 1.2500 over 40 steps" in text
    assert "r=16 46240 trainable" in text and "perplexity 12.000 -> 6.000" in text and "size" not in text
    assert "adapter_model.safetensors" in text
