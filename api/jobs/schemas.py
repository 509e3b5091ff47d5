"""Response shapes of the jobs API."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from qaas.db.models import Job, JobEvent
from qaas.job_store import EVENT_COLUMNS, event_row_of, row_of


class JobError(BaseModel):
    code: str
    message: str
    stage: str | None = None
    field: str | None = None


class OutputFile(BaseModel):
    name: str
    size: int
    url: str


class JobLinks(BaseModel):
    self: str
    events: str
    cancel: str
    files: str


class JobOut(BaseModel):
    id: uuid.UUID
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    stage: str | None = Field(description="resolve | load | calibrate | quantize | evaluate | export | publish")
    progress: float = Field(description="fraction of the current stage done, 0..1")
    progress_message: str | None
    kind: str = Field(description="quantize | finetune")
    method: str
    bits: int | None
    model: str
    source_revision: str | None
    priority: int
    attempt: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    timings: dict[str, float] = Field(description="seconds per finished stage")
    error: JobError | None
    files: list[OutputFile] | None = Field(description="output files with sizes, on success")
    result: dict[str, Any] | None
    request: dict[str, Any]
    links: JobLinks

    @classmethod
    def from_job(cls, job: Job) -> "JobOut":
        return cls.model_validate(orm_job_document(job))


def orm_job_document(job: Job) -> dict[str, Any]:
    return job_document(row_of(job))


def job_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """A job row (`job_store.JOB_COLUMNS` -> value) as the JobOut document, fields in schema order.

    The one place the API's job shape is made: the ORM paths (JobOut.from_job) and the direct SQL reads
    of the hot paths (`reads.py`, serialized with pydantic_core.to_json without building a model) both
    come through here, so the two cannot drift apart."""
    job_id = row["id"]
    base = f"/v1/jobs/{job_id}"
    result = row["result"]
    files = None
    if result and row["status"] == "succeeded":
        files = [{"name": f["name"], "size": f["size"], "url": f"{base}/files/{f['name']}"}
                 for f in result.get("files", [])]
    error = row["error"]
    if error:
        error = {"code": error["code"], "message": error["message"], "stage": error.get("stage"),
                 "field": error.get("field")}
    return {
        "id": job_id, "status": row["status"], "stage": row["stage"], "progress": row["progress"],
        "progress_message": row["progress_message"], "kind": row["kind"], "method": row["method"], "bits": row["bits"],
        "model": row["source_model"], "source_revision": row["source_revision"], "priority": row["priority"],
        "attempt": row["attempt"], "max_attempts": row["max_attempts"], "worker": row["worker"],
        "cancel_requested": row["cancel_requested"], "created_at": row["created_at"],
        "started_at": row["started_at"], "finished_at": row["finished_at"], "updated_at": row["updated_at"],
        "timings": row["timings"] or {}, "error": error or None, "files": files, "result": result,
        "request": row["request"],
        "links": {"self": base, "events": f"{base}/events", "cancel": f"{base}/cancel", "files": f"{base}/files"},
    }


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class EventOut(BaseModel):
    id: int
    created_at: dt.datetime
    kind: str = Field(description="status | stage | progress | log")
    stage: str | None
    message: str | None
    data: dict[str, Any] | None

    @classmethod
    def from_event(cls, e: JobEvent) -> "EventOut":
        return cls.model_validate(event_document(event_row_of(e)))


def event_document(row: Mapping[str, Any]) -> dict[str, Any]:
    """An event row as the EventOut document (the same for ORM objects and direct reads)."""
    return {c: row[c] for c in EVENT_COLUMNS}


class EventPage(BaseModel):
    items: list[EventOut]
    job_status: str


class JobCreated(JobOut):
    webhook_secret: str | None = Field(
        default=None, description="the generated secret of the request's webhook: returned once, here")
