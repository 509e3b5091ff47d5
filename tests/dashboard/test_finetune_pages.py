"""A fine-tuning job on the dashboard: its label, the loss curve drawn by the server (no script), the result
panel, and retrying it as a new fine-tuning job."""

from __future__ import annotations

import re
import uuid
from types import SimpleNamespace

from conftest import STORIES, auth
from dashboard.test_dashboard_http import ORIGIN, _csrf, sign_in

from qaas import job_store
from qaas.api.dashboard import loss_curve
from qaas.db.models import JobStatus
from qaas.db.session import session_scope

FT = {"kind": "finetune", "model": {"path": str(STORIES)}, "dataset": ["Once upon a time there was a cat."],
      "lora": {"r": 16}, "training": {"max_steps": 6, "optim": "adamw_torch"}}


def _ev(metrics):
    return SimpleNamespace(kind="progress", data={"metrics": metrics})


def test_points_come_from_the_events_and_the_result_fills_the_rest():
    events = [_ev({"step": 0, "eval_loss": 6.0}), _ev({"step": 2, "loss": 5.0, "lr": 1e-3}),
              _ev({"step": 4, "loss": 4.0, "eval_loss": 4.5}), _ev({"block": 1, "rel_error": {"a": 0.1}})]
    assert loss_curve.points(events, None) == {"train": [(2.0, 5.0), (4.0, 4.0)], "eval": [(0.0, 6.0), (4.0, 4.5)]}
    result = {"loss": {"curve": [[1, 5.5, 0.0], [2, 5.0, 0.1], [3, 4.6, 0.1], [4, 4.0, 0.1]], "evals": [[6, 4.2]]}}
    got = loss_curve.points(events, result)
    assert [s for s, _ in got["train"]] == [1.0, 2.0, 3.0, 4.0] and got["eval"][-1] == (6.0, 4.2)
    svg = str(loss_curve.svg(got))
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and 'class="loss-train"' in svg
    assert loss_curve.svg({"train": [], "eval": []}) is None


def test_the_job_page_draws_the_loss_curve_and_the_list_labels_the_kind(client, settings, api_key):
    jid = client.post("/v1/jobs", json=FT, headers=auth(api_key)).json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        job_store.record_stage(s, job.id, job.attempt, "train", timings={})
        for step, metrics in ((0, {"step": 0, "eval_loss": 6.2}), (3, {"step": 3, "loss": 5.1, "lr": 1e-4}),
                              (6, {"step": 6, "loss": 4.2, "lr": 0.0})):
            job_store.record_progress(s, job.id, job.attempt, stage="train", fraction=step / 6,
                                      message=f"step {step}/6", data={"done": step, "total": 6, "metrics": metrics})
        attempt = job.attempt
    sign_in(client, api_key)
    page = client.get(f"/dashboard/jobs/{jid}").text
    assert "QLoRA r16 on NF4 +DQ" in page and "Per-layer quantization error" not in page
    chart = re.search(r'<section class="card" aria-labelledby="loss-h" id="loss-curve">(.*?)</section>', page, re.S)
    assert chart and "<svg" in chart.group(1) and chart.group(1).count("<circle") == 1  # the eval before training
    assert re.search(r'<path class="loss-train" d="M[\d.]+,[\d.]+ L[\d.]+,[\d.]+"', chart.group(1))
    live = client.get(f"/dashboard/jobs/{jid}/live").text  # the panel the page swaps in redraws it
    assert 'id="loss-curve"' in live and "<svg" in live
    assert "QLoRA r16 on NF4 +DQ" in client.get("/dashboard/jobs").text

    result = {"kind": "finetune", "files": [], "evaluation": {"perplexity_before": 490.0, "perplexity_after": 70.0},
              "loss": {"first": 5.3, "last": 4.2, "curve": [[i, 5.3 - 0.2 * i, 1e-4] for i in range(1, 7)],
                       "evals": [[0, 6.2], [6, 4.4]]},
              "lora": {"trainable_parameters": 46240, "total_parameters": 306272},
              "training": {"total_steps": 6, "optim": "adamw_torch"}, "resumed_from_step": 3,
              "data": {"held_out": "eval_dataset"}}
    with session_scope(settings.resolved_database_url) as s:
        assert job_store.finish(s, uuid.UUID(jid), attempt, JobStatus.succeeded, result=result)
    page = client.get(f"/dashboard/jobs/{jid}").text
    chart = re.search(r'id="loss-curve">(.*?)</section>', page, re.S).group(1)
    assert chart.count("<circle") == 2 and "5.3000 / 4.2000" in chart and "46240 of 306272" in chart
    assert "Resumed from the checkpoint of step 3" in chart


def test_a_cancelled_finetune_job_is_retried_as_a_finetune_job(client, api_key):
    jid = client.post("/v1/jobs", json=FT, headers=auth(api_key)).json()["id"]
    sign_in(client, api_key)
    page = client.get(f"/dashboard/jobs/{jid}")
    client.post(f"/dashboard/jobs/{jid}/cancel", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN)
    page = client.get(f"/dashboard/jobs/{jid}")
    r = client.post(f"/dashboard/jobs/{jid}/retry", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN,
                    follow_redirects=False)
    assert r.status_code == 303 and "notice=retried" in r.headers["location"], r.text
    new = client.get(f"/v1/jobs/{r.headers['location'].split('/')[-1].split('?')[0]}", headers=auth(api_key)).json()
    old = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    assert new["kind"] == "finetune" and new["request"] == old["request"] and new["id"] != jid


def test_webhook_payloads_say_the_kind_and_how_training_went(client, settings, api_key):
    from qaas.db.models import Job
    from qaas.webhooks import outbox

    jid = client.post("/v1/jobs", json=FT, headers=auth(api_key)).json()["id"]
    result = {"kind": "finetune", "files": [{"name": "adapter_model.safetensors", "size": 10}],
              "evaluation": {"perplexity_before": 9.0, "perplexity_after": 5.0},
              "loss": {"first": 2.0, "last": 1.0, "min": 0.9, "evals": [[0, 2.1], [6, 1.2]], "curve": [[1, 2.0, 0.1]]},
              "resumed_from_step": None}
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        assert job_store.finish(s, job.id, job.attempt, JobStatus.succeeded, result=result)
    with session_scope(settings.resolved_database_url) as s:
        payload = outbox.job_payload(s.get(Job, uuid.UUID(jid)))
    assert payload["kind"] == "finetune" and payload["method"] == "qlora"
    assert payload["result"]["loss"] == {"first": 2.0, "last": 1.0, "min": 0.9, "evals": [[0, 2.1], [6, 1.2]]}
    assert payload["result"]["evaluation"]["perplexity_after"] == 5.0
