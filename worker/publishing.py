"""Publishing a finished model to the Hub: the job's last stage, on the I/O queue.

The GPU worker hands the job over (stage `publish`, artefacts on disk) and returns to the GPU queue,
so a slow upload never holds a GPU. This task claims the publish with a lease, writes the model card,
uploads the folder in one commit (idempotent: a retried publish of the same content makes no second
commit), streams byte progress into the job's events, and writes the job's verdict.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from qaas import __version__, job_store
from qaas.db.models import JobStatus
from qaas.db.retry import with_db_retry
from qaas.job_store import PUBLISH_STAGE
from qaas.kit.redaction import redact
from qaas.queue import send_publish
from qaas.security import decrypt_secret
from qaas.settings import Settings
from qaas.worker.verdict import finish_job

log = logging.getLogger("qaas.publish")
_ERROR_CODES = {"HubAuthError": "hub_auth", "HubPermissionError": "hub_forbidden", "HubNotFoundError": "hub_not_found",
                "HubConflictError": "hub_conflict", "HubRequestError": "hub_rejected"}


def _claim(session, job_id: uuid.UUID, me: str, lease_s: float) -> dict[str, Any] | None:
    job = job_store.claim_publish(session, job_id, worker=me, lease_s=lease_s)
    if job is None:
        return None
    return {"attempt": job.attempt, "request": job.request, "result": dict(job.result or {}), "owner": job.owner,
            "token_encrypted": job_store.hub_token_encrypted(session, job), "publish_attempts": job.publish_attempts,
            "source": job.source_model, "source_revision": job.source_revision, "timings": dict(job.timings or {}),
            "cancel": job.cancel_requested, "base_source": _base_source(session, job)}


def _base_source(session, job) -> str:
    """What a fine-tuning job's adapter was trained on: its model, or for a {"job"} base that job's model."""
    base_id = ((job.request or {}).get("model") or {}).get("job")
    if base_id is None:
        return job.source_model
    base = job_store.get_job(session, uuid.UUID(str(base_id)), job.owner)
    return base.source_model if base is not None else job.source_model


def card_info(job: dict[str, Any], repo_id: str, revision: str | None, endpoint: str, job_id: uuid.UUID) -> dict[str, Any]:
    result, request = job["result"], job["request"]
    model = request.get("model") or {}
    return {
        "repo_id": repo_id,
        "revision": revision,
        "source": {"id": model.get("id") or model.get("path"), "revision": job["source_revision"] or model.get("revision")},
        "quantization_config": result.get("quantization_config") or request.get("quantization_config"),
        "calibration": result.get("calibration"),
        "evaluation": result.get("evaluation"),
        "gguf": result.get("gguf"),
        "size": {"before_bytes": result.get("size_before_bytes"), "after_bytes": result.get("size_after_bytes")},
        "gptq": result.get("gptq"),
        "bitsandbytes": result.get("bitsandbytes"),
        "job_id": str(job_id),
        "qaas_version": __version__,
        "endpoint": endpoint,
    }


def adapter_card_info(job: dict[str, Any], repo_id: str, revision: str | None, endpoint: str,
                      job_id: uuid.UUID) -> dict[str, Any]:
    from qaas.worker.publish.adapter_card import hub_base

    base = job["base_source"]
    return {"repo_id": repo_id, "revision": revision, "base_model": hub_base(base),
            "base_label": base.rstrip("/").split("/")[-1] if base.startswith("/") else base,
            "result": job["result"], "job_id": str(job_id), "qaas_version": __version__, "endpoint": endpoint}


def run_publish(settings: Settings, job_id: uuid.UUID, *, worker: str) -> str:
    from qaas.worker.publish.hub import PublishError, default_repo_id, publish_folder
    from qaas.worker.publish.model_card import method_and_bits, render_model_card

    db = settings.database
    job = with_db_retry(db, lambda s: _claim(s, job_id, worker, settings.lease_s))
    if job is None:
        return "duplicate"
    attempt = job["attempt"]
    secret = settings.secret_key.get_secret_value()
    token = decrypt_secret(job["token_encrypted"], secret) if job["token_encrypted"] else None
    folder = settings.artifacts_dir / str(job_id)
    push = job["request"].get("push_to_hub") or {}

    def fail(code: str, message: str) -> str:
        error = {"code": code, "message": redact(message, token), "stage": PUBLISH_STAGE}
        ok = finish_job(settings, job_id, attempt, JobStatus.failed, error=error, result=job["result"])
        return "failed" if ok else "lost"

    if job["cancel"]:
        ok = finish_job(settings, job_id, attempt, JobStatus.cancelled, result=job["result"])
        return "cancelled" if ok else "lost"
    if not folder.is_dir():
        return fail("publish_failed", "the quantized model is no longer on disk; it cannot be published")
    if token is None:
        return fail("hub_auth", "no Hub token: pass hf_token with the job or save one with PUT /v1/hub-token")

    finetune = job["request"].get("kind") == "finetune"
    qc = job["result"].get("quantization_config") or job["request"]["quantization_config"]
    repo_id = push.get("repo_id")
    if not repo_id:
        try:
            from huggingface_hub import HfApi

            owner = HfApi(endpoint=settings.hub_endpoint).whoami(token=token)["name"]
        except Exception as exc:  # noqa: BLE001 - translated into a clear failure below
            return fail("hub_auth", f"cannot tell whose token this is to name the repo ({exc.__class__.__name__}); set push_to_hub.repo_id")
        method, bits = ("qlora", 4) if finetune else method_and_bits(qc)
        repo_id = default_repo_id(job["base_source"] if finetune else job["source"], owner, method, bits,
                                  qc.get("group_size"), quant_type=qc.get("bnb_4bit_quant_type"))

    if finetune:
        from qaas.worker.publish.adapter_card import render_adapter_card

        card = render_adapter_card(adapter_card_info(job, repo_id, push.get("revision"), settings.hub_endpoint,
                                                     job_id))
    else:
        card = render_model_card(card_info(job, repo_id, push.get("revision"), settings.hub_endpoint, job_id))
    (folder / "README.md").write_text(card)

    stop = threading.Event()
    lost = threading.Event()

    def keep_lease() -> None:
        while not stop.wait(settings.heartbeat_interval_s):
            def beat(s) -> bool:
                return job_store.heartbeat(s, job_id, attempt, lease_s=settings.lease_s, worker=worker)[0]
            try:
                if not with_db_retry(db, beat, deadline_s=settings.lease_s):
                    lost.set()
            except Exception:  # noqa: BLE001 - the database is down; the upload goes on, the verdict will retry
                pass

    last_write = [0.0]

    def on_progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last_write[0] < 0.5 and done < total:
            return
        last_write[0] = now
        with_db_retry(db, lambda s: job_store.record_progress(
            s, job_id, attempt, stage=PUBLISH_STAGE, fraction=done / total if total else 1.0,
            message=f"uploaded {done} of {total} bytes", data={"bytes_done": done, "bytes_total": total}))

    beat_thread = threading.Thread(target=keep_lease, daemon=True, name=f"publish-lease-{job_id}")
    beat_thread.start()
    started = time.monotonic()
    try:
        hub = publish_folder(folder, repo_id=repo_id, token=token, endpoint=settings.hub_endpoint,
                             private=bool(push.get("private", True)), revision=push.get("revision"),
                             create_pr=bool(push.get("create_pr")), commit_message=push.get("commit_message"),
                             progress=on_progress, attempts=2)
    except PublishError as exc:
        stop.set()
        message = redact(str(exc), token)
        if exc.retryable and job["publish_attempts"] < settings.publish_max_attempts:
            delay = min(300.0, 5.0 * 2 ** (job["publish_attempts"] - 1))
            with_db_retry(db, lambda s: job_store.release_publish(s, job_id, attempt, worker=worker, message=message,
                                                                  retry_in_s=delay))
            send_publish(settings, job_id, countdown=delay)
            return "retrying"
        return fail(_ERROR_CODES.get(type(exc).__name__, "hub_error"), f"publishing to {repo_id} failed: {message}")
    finally:
        stop.set()
    if lost.is_set():
        return "lost"
    result = dict(job["result"])
    result["hub"] = {**hub, "endpoint": settings.hub_endpoint, "url": f"{settings.hub_endpoint.rstrip('/')}/{hub['repo_id']}"}
    files = {f["name"]: f for f in result.get("files") or []}
    files["README.md"] = {"name": "README.md", "size": (folder / "README.md").stat().st_size}
    result["files"] = sorted(files.values(), key=lambda f: f["name"])
    timings = {**job["timings"], PUBLISH_STAGE: round(time.monotonic() - started, 3)}
    result["timings"] = {**(result.get("timings") or {}), **timings}
    ok = finish_job(settings, job_id, attempt, JobStatus.succeeded, result=result, timings=timings)
    return "succeeded" if ok else "lost"
