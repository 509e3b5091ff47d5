"""Submitting and cancelling jobs: the rules, with the session passed in (no logic in routers)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qaas.api.problems import Problem
from qaas import job_store
from qaas.db.models import Job
from qaas.queue import send_run_job
from qaas.api.webhook_urls import check_webhook_url
from qaas.kit.webhook_signing import generate_secret
from qaas.schemas.job_request import JobRequest, LocalModel
from qaas.security import encrypt_secret
from qaas.settings import Settings

log = logging.getLogger("qaas.api.jobs")


def _invalid(field: str, message: str) -> Problem:
    return Problem(422, "Invalid request", f"{field}: {message}", slug="validation-error",
                   errors=[{"field": field, "message": message}])


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


def check_calibration_file(settings: Settings, dataset: object) -> None:
    """A `dataset` naming a file on the worker's disk must be under the allowed roots, like model.path.

    The engine reads such a file as calibration text; without this check any file the worker can read
    (/etc/..., another tenant's upload) could be named, and its existence probed through the error."""
    if not isinstance(dataset, str):
        return
    looks_local = dataset.startswith(("/", ".", "~")) or Path(dataset).suffix.lower() in (".txt", ".jsonl", ".json")
    if not looks_local:
        return  # a dataset name (c4, wikitext2) or a Hub dataset id
    field = "quantization_config.dataset"
    roots = settings.model_roots
    if not roots:
        raise _invalid(field, "local calibration files are disabled on this server (no QAAS_LOCAL_MODEL_ROOTS)")
    candidate = Path(dataset)
    if not candidate.is_absolute():
        raise _invalid(field, "a calibration file must be an absolute path")
    try:
        resolved = candidate.resolve()  # roots first: no existence oracle for paths outside them
    except (OSError, RuntimeError):
        raise _invalid(field, "no such calibration file")
    if not any(resolved.is_relative_to(root) for root in roots):
        raise _invalid(field, "the calibration file is outside the allowed roots")
    if not resolved.exists():
        raise _invalid(field, "no such calibration file")
    if not resolved.is_file():
        raise _invalid(field, "the calibration file is not a regular file")


def fingerprint(req: JobRequest) -> str:
    body = req.public_dict()
    if req.hf_token is not None:
        body["hf_token_sha256"] = hashlib.sha256(req.hf_token.get_secret_value().encode()).hexdigest()
    if req.webhook is not None and req.webhook.secret is not None:
        body["webhook_secret_sha256"] = hashlib.sha256(req.webhook.secret.get_secret_value().encode()).hexdigest()
    return job_store.request_fingerprint(body)


@dataclass
class Submission:
    job: Job
    replayed: bool
    #: Generated for a webhook given without a secret; shown to the caller once.
    webhook_secret: str | None = None


def submit(session: Session, settings: Settings, owner: str, req: JobRequest, idempotency_key: str | None) -> Submission:
    if idempotency_key is not None and (not idempotency_key.strip() or len(idempotency_key) > 255):
        raise _invalid("Idempotency-Key", "must be 1 to 255 characters")
    if isinstance(req.model, LocalModel):
        check_local_path(settings, req.model.path)
    if req.webhook is not None:
        check_webhook_url(settings, str(req.webhook.url), field="webhook.url")
    check_calibration_file(settings, getattr(req.quantization_config, "dataset", None))

    request_hash = fingerprint(req)
    if idempotency_key:
        existing = job_store.find_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash)

    token = req.hf_token.get_secret_value() if req.hf_token else None
    key = settings.secret_key.get_secret_value()
    generated_secret = None
    webhook_secret_encrypted = None
    if req.webhook is not None:
        secret = req.webhook.secret.get_secret_value() if req.webhook.secret else None
        if secret is None:
            secret = generated_secret = generate_secret()
        webhook_secret_encrypted = encrypt_secret(secret, key)
    job = job_store.create_job(
        session,
        owner=owner,
        request=req.public_dict(),
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        method=req.method,
        bits=req.bits,
        source_model=req.source_label,
        priority=req.options.priority,
        max_attempts=settings.job_max_attempts,
        hf_token_encrypted=encrypt_secret(token, key) if token else None,
        webhook_secret_encrypted=webhook_secret_encrypted,  # in the INSERT, not a later UPDATE
    )
    try:
        session.commit()
    except IntegrityError:
        # Two requests with the same Idempotency-Key raced; the other one won.
        session.rollback()
        existing = job_store.find_by_idempotency_key(session, owner, idempotency_key or "")
        if existing is None:
            raise
        return _replay(existing, request_hash)

    # Only after the commit: a worker that gets the message must find the row.
    dispatch(session, settings, job)
    return Submission(job, replayed=False, webhook_secret=generated_secret)


def _replay(existing: Job, request_hash: str) -> Submission:
    if existing.request_hash != request_hash:
        raise Problem(422, "Idempotency key reused", "this Idempotency-Key was used with a different request body",
                      slug="idempotency-key-reused", errors=[{"field": "Idempotency-Key", "message": "reused with a different body"}])
    return Submission(existing, replayed=True)


def dispatch(session: Session, settings: Settings, job: Job) -> None:
    if send_run_job(settings, job.id, priority=job.priority):
        # One statement in autocommit (BEGIN + UPDATE + COMMIT were three round trips per submission).
        from qaas.db.session import get_engine

        with get_engine(settings.resolved_database_url).connect().execution_options(
                isolation_level="AUTOCOMMIT") as conn:
            when = job_store.mark_dispatched(conn, job.id)
        # what the UPDATE wrote, without reading the row back (a round trip per submission)
        from sqlalchemy.orm.attributes import set_committed_value

        set_committed_value(job, "dispatched_at", when)
