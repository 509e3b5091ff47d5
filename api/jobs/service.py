"""Submitting and cancelling jobs: the rules, with the session passed in (no logic in routers).

The API's routes and the dashboard's forms both come through here; the rows themselves are written by
`qaas.job_store` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qaas import job_store
from qaas.api.jobs.schemas import job_document, orm_job_document
from qaas.api.problems import Problem
from qaas.api.problems import invalid_field as _invalid
from qaas.db.models import TERMINAL_STATUSES, Job, JobStatus
from qaas.db.session import get_sessionmaker
from qaas import quantization_rules
from qaas.quantization_rules import InvalidQuantizationConfig
from qaas.queue import send_run_job
from qaas.quantization_rules import finetune as finetune_rules
from qaas.quantization_rules import gpus as gpu_rules
from qaas.quantization_rules import training as training_rules
from qaas.quantization_rules.fields import FieldError
from qaas.schemas.finetune_request import FinetuneRequest
from qaas.schemas.job_request import JobRequest, LocalModel
from qaas.schemas.requests import kind_of
from qaas.security import encrypt_secret
from qaas.settings import Settings
from qaas.webhooks import outbox
from qaas.webhooks.signing import generate_secret
from qaas.webhooks.urls import RefusedUrl, check_webhook_url

log = logging.getLogger("qaas.api.jobs")


def check_local_path(settings: Settings, raw: str) -> Path:
    """A local model must resolve (symlinks followed) to a directory under an allowed root."""
    roots = settings.model_roots
    if not roots:
        raise _invalid("model.path", "local paths are disabled on this server (no QAAS_LOCAL_MODEL_ROOTS)")
    candidate = Path(raw)
    if not candidate.is_absolute():
        raise _invalid("model.path", "must be an absolute path")
    try:
        # roots first, then existence: a path outside the roots says nothing about whether it exists
        resolved = candidate.resolve()
    except (RuntimeError, OSError):
        raise _invalid("model.path", "no such directory")
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise _invalid("model.path", "is outside the allowed model roots")
    if not resolved.exists():
        raise _invalid("model.path", "no such directory")
    if not resolved.is_dir():
        raise _invalid("model.path", "is not a directory")
    return resolved


def with_resolved_model_path(settings: Settings, req: JobRequest) -> JobRequest:
    """The request with a local model's path checked and stored as the directory it resolves to: the job's
    model is then named the same however it was written (`../models/x`, a symlink, a trailing slash)."""
    if not isinstance(req.model, LocalModel):
        return req
    return req.model_copy(update={"model": LocalModel(path=str(check_local_path(settings, req.model.path)))})


def check_quantization_sources(settings: Settings, config: dict, where: str = "quantization_config") -> None:
    """What the job reads must be there: calibration data named by `dataset` is a file under the allowed
    roots, a registered local copy, or a dataset a hub can give (the rules the engine applies too).
    `where`: the config's field in the request (a fine-tuning job's merge names merge.quantization_config)."""
    try:
        quantization_rules.check_sources(config, settings.calibration_sources)
    except InvalidQuantizationConfig as exc:
        raise _invalid(f"{where}.{exc.field}", exc.message) from None


def check_model_architecture(model: Any, config: dict, where: str = "quantization_config") -> None:
    """A method with architecture rules (AWQ's scaling maps, GGUF's converted architectures) refuses a local
    model it cannot take now, from its config.json; a Hub model's config is read by the engine before it
    loads any weight."""
    if not isinstance(model, LocalModel):
        return
    try:
        model_config = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the engine reports an unreadable config.json, naming the source
    if not isinstance(model_config, dict):
        return
    try:
        quantization_rules.check_model(config, model_config)
    except InvalidQuantizationConfig as exc:  # names `model` (the request's field), or a field of the config
        field = exc.field if exc.field == "model" else f"{where}.{exc.field}"
        raise _invalid(field, exc.message) from None


def check_finetune(settings: Settings, req: FinetuneRequest, base_job: dict | None) -> None:
    """What a fine-tuning job reads must be there and its recipe must run on this server's workers:
    training data (files under the roots, Hub datasets fetchable or registered), an optimizer the device
    has, and a base job that is the caller's own, succeeded, and trainable (`base_job`: its row, or None
    when it is not the caller's)."""
    for name in ("dataset", "eval_dataset"):
        value = getattr(req, name)
        if value is not None:
            try:
                finetune_rules.check_data_source(value, settings.calibration_sources, name)
            except FieldError as exc:
                raise _invalid(exc.field, exc.message) from None
    problem = training_rules.device_problem(req.training, settings.device)
    if problem:
        raise _invalid("training.optim", problem)
    if req.merge is not None:  # the second output is a quantization job's output: the same checks
        check_quantization_sources(settings, req.merge.quantization_config, "merge.quantization_config")
        check_model_architecture(req.model, req.merge.quantization_config, "merge.quantization_config")
    if req.base_job is None:
        return
    if base_job is None:
        raise _invalid("model.job", "no such job of yours")
    if base_job["status"] != JobStatus.succeeded.value:
        raise _invalid("model.job", f"the job has not succeeded (it is {base_job['status']})")
    if base_job.get("kind", "quantize") != "quantize":
        raise _invalid("model.job", "the job's output is a LoRA adapter, not a model; fine-tune its base model")
    if base_job["method"] != "bitsandbytes" or base_job["bits"] != 4:
        raise _invalid("model.job", f"the job's output is {base_job['method']} {base_job['bits']}-bit; fine-tuning "
                                    "trains on a bitsandbytes 4-bit base (quantize with load_in_4bit, or "
                                    "fine-tune the original model)")
    if req.quantization_config is not None:
        raise _invalid("quantization_config", "the base job's output is already quantized and is loaded with its "
                                              "own config; leave quantization_config out")


def check_eval_text(settings: Settings, req: JobRequest) -> None:
    """`options.eval_text` can be read here and is not the calibration data itself (qaas.eval_text)."""
    from qaas import eval_text

    value = req.options.eval_text
    if value is None:
        return
    try:
        eval_text.check_can_be_had(value, settings.calibration_sources)
        eval_text.check_not_calibration(value, (req.quantization_config or {}).get("dataset"),
                                        settings.calibration_sources.roots)
    except FieldError as exc:
        raise _invalid(exc.field, exc.message) from None


def check_gpus(settings: Settings, req: JobRequest | FinetuneRequest) -> None:
    """`options.gpus` within what this server's workers give one job (QAAS_MAX_GPUS_PER_JOB)."""
    try:
        gpu_rules.check(req.options.gpus, method=req.method, bound=settings.max_gpus_per_job)
    except FieldError as exc:
        raise _invalid(exc.field, exc.message) from None


def fingerprint(req: JobRequest | FinetuneRequest, public: dict | None = None) -> str:
    """The Idempotency-Key comparison's hash of the request (`public`: its `public_dict()`, when the caller
    already has it; not modified)."""
    body = dict(public) if public is not None else req.public_dict()
    if req.hf_token is not None:
        body["hf_token_sha256"] = hashlib.sha256(req.hf_token.get_secret_value().encode()).hexdigest()
    if req.webhook is not None and req.webhook.secret is not None:
        body["webhook_secret_sha256"] = hashlib.sha256(req.webhook.secret.get_secret_value().encode()).hexdigest()
    return job_store.request_fingerprint(body)


@dataclass
class NewJob:
    """A validated submission: the fields of the row to store (`job_store.new_job_row`; secrets already
    encrypted), and a webhook secret generated for it."""

    fields: dict
    #: Generated for a webhook given without a secret; shown to the caller once.
    generated_secret: str | None

    @property
    def request_hash(self) -> str:
        return self.fields["request_hash"]

    @property
    def idempotency_key(self) -> str | None:
        return self.fields["idempotency_key"]


@dataclass
class Submission:
    job_id: uuid.UUID
    #: The job as a JobOut document (schemas.job_document).
    document: dict
    replayed: bool
    #: Generated for a webhook given without a secret; shown to the caller once.
    webhook_secret: str | None = None


def prepare(settings: Settings, owner: str, req: JobRequest | FinetuneRequest, idempotency_key: str | None,
            base_job: dict | None = None) -> NewJob:
    """Every check a submission must pass before anything is stored, and the row it becomes (`base_job`: the
    row of a fine-tuning job's {"job"} base, when it is the owner's)."""
    if idempotency_key is not None and (not idempotency_key.strip() or len(idempotency_key) > 255):
        raise _invalid("Idempotency-Key", "must be 1 to 255 characters")
    req = with_resolved_model_path(settings, req)
    if req.webhook is not None:
        try:
            check_webhook_url(str(req.webhook.url), settings.webhook_allowlist)
        except RefusedUrl as exc:
            raise _invalid("webhook.url", exc.reason)
    if isinstance(req, FinetuneRequest):
        check_finetune(settings, req, base_job)
    else:
        check_quantization_sources(settings, req.quantization_config)
        check_model_architecture(req.model, req.quantization_config)
        check_eval_text(settings, req)
    check_gpus(settings, req)

    token = req.hf_token.get_secret_value() if req.hf_token else None
    key = settings.secret_key.get_secret_value()
    generated_secret = None
    webhook_secret_encrypted = None
    if req.webhook is not None:
        secret = req.webhook.secret.get_secret_value() if req.webhook.secret else None
        if secret is None:
            secret = generated_secret = generate_secret()
        webhook_secret_encrypted = encrypt_secret(secret, key)
    public = req.public_dict()
    fields = dict(
        owner=owner, kind=kind_of(req), request=public, request_hash=fingerprint(req, public), idempotency_key=idempotency_key or None,
        method=req.method, bits=req.bits, source_model=req.source_label, priority=req.options.priority,
        max_attempts=settings.job_max_attempts, hf_token_encrypted=encrypt_secret(token, key) if token else None,
        webhook_secret_encrypted=webhook_secret_encrypted)  # in the INSERT, not a later UPDATE
    return NewJob(fields, generated_secret)


def submit(session: Session, settings: Settings, owner: str, req: JobRequest | FinetuneRequest, idempotency_key: str | None) -> Submission:
    """Store and queue a job through the ORM session (embedded SQLite, the dashboard); blocking."""
    base = _base_job_orm(session, owner, req)
    new = prepare(settings, owner, req, idempotency_key, base)
    if new.idempotency_key:
        existing = job_store.find_by_idempotency_key(session, owner, new.idempotency_key)
        if existing is not None:
            return _replay(existing.request_hash, existing.id, orm_job_document(existing), new.request_hash)

    job = job_store.create_job(session, **new.fields)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same Idempotency-Key raced; the other one won.
        session.rollback()
        existing = job_store.find_by_idempotency_key(session, owner, new.idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing.request_hash, existing.id, orm_job_document(existing), new.request_hash)

    # Only after the commit: a worker that gets the message must find the row.
    if send_run_job(settings, job.id, priority=job.priority, gpus=req.options.gpus):
        job_store.mark_dispatched(session, job.id)
        session.commit()
    return Submission(job.id, orm_job_document(job), replayed=False, webhook_secret=new.generated_secret)


def _base_job_orm(session: Session, owner: str, req: JobRequest | FinetuneRequest) -> dict | None:
    base_id = getattr(req, "base_job", None)
    job = job_store.get_job(session, base_id, owner) if base_id is not None else None
    return None if job is None else job_store.row_of(job)


def _replay(stored_hash: str, job_id: uuid.UUID, document: dict, request_hash: str) -> Submission:
    if stored_hash != request_hash:
        raise Problem(422, "Idempotency key reused", "this Idempotency-Key was used with a different request body",
                      slug="idempotency-key-reused", errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}])
    return Submission(job_id, document, replayed=True)


async def submit_async(settings: Settings, owner: str, req: JobRequest | FinetuneRequest, idempotency_key: str | None) -> Submission:
    """Store and queue a job from async code: directly on PostgreSQL, else (embedded SQLite) through the
    ORM path in the thread pool."""
    if settings.database.direct:
        return await submit_direct(settings, owner, req, idempotency_key)
    from starlette.concurrency import run_in_threadpool

    def in_session() -> Submission:
        with get_sessionmaker(settings.database)() as session:
            return submit(session, settings, owner, req, idempotency_key)

    return await run_in_threadpool(in_session)


async def submit_direct(settings: Settings, owner: str, req: JobRequest | FinetuneRequest, idempotency_key: str | None) -> Submission:
    """`submit` on PostgreSQL without the ORM: the row stored by this process's inserter (one multi-row
    INSERT for the submissions that arrive together, `api/job_inserts.py`), then the message handed to its
    dispatcher (batched publishing)."""
    from qaas.api.dispatch import dispatcher_for
    from qaas.api.job_inserts import inserter_for

    db = settings.database
    base_id = getattr(req, "base_job", None)
    base = await job_store.fetch_job(db, base_id, owner) if base_id is not None else None
    new = prepare(settings, owner, req, idempotency_key, base)
    if new.idempotency_key:
        replay = await _direct_replay(db, owner, new)
        if replay is not None:
            return replay
    row = await inserter_for(settings).insert(new.fields)  # with whatever else is being submitted now
    if row is None:  # the same Idempotency-Key won a race with this request
        replay = await _direct_replay(db, owner, new)
        if replay is None:
            raise RuntimeError("idempotency conflict without a stored job")
        return replay
    # Only after the INSERT committed: a worker that gets the message must find the row.
    await dispatcher_for(settings).dispatch(row["id"], row["priority"], req.options.gpus)
    return Submission(row["id"], job_document(row), replayed=False, webhook_secret=new.generated_secret)


async def _direct_replay(db, owner: str, new: NewJob) -> Submission | None:
    found = await job_store.fetch_by_idempotency_key(db, owner, new.idempotency_key)
    if found is None:
        return None
    stored_hash, row = found
    return _replay(stored_hash, row["id"], job_document(row), new.request_hash)


def cancel(session: Session, settings: Settings, owner: str, job_id: uuid.UUID) -> Job:
    """Cancel the owner's job: a queued one at once, a running one as soon as its worker stops it. The one
    cancel of the service (the API's route and the dashboard's button): after the commit, the webhook
    deliveries announcing a cancellation go to the I/O queue right away. Raises a 404 Problem for a job
    that is not the owner's, 409 for one that already finished."""
    job = job_store.get_job(session, job_id, owner)
    if job is None:
        raise Problem(404, "Not found", "no such job", slug="not-found")
    if job.status in TERMINAL_STATUSES:
        raise Problem(409, "Conflict", f"the job already finished ({job.status})", slug="job-finished")
    job = job_store.request_cancel(session, job)
    session.commit()
    if job.status == JobStatus.cancelled.value:
        outbox.send_job_deliveries(settings, job.id)
    return job
