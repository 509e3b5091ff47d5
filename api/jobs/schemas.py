"""Response shapes of the jobs API."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, Field

from qaas.db.models import Job, JobEvent


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
        base = f"/v1/jobs/{job.id}"
        files = None
        if job.result and job.status == "succeeded":
            files = [OutputFile(name=f["name"], size=f["size"], url=f"{base}/files/{f['name']}")
                     for f in job.result.get("files", [])]
        return cls(
            id=job.id, status=job.status, stage=job.stage, progress=job.progress, progress_message=job.progress_message,
            method=job.method, bits=job.bits, model=job.source_model, source_revision=job.source_revision,
            priority=job.priority, attempt=job.attempt, max_attempts=job.max_attempts, worker=job.worker,
            cancel_requested=job.cancel_requested, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, updated_at=job.updated_at, timings=job.timings or {},
            error=JobError(**job.error) if job.error else None, files=files, result=job.result, request=job.request,
            links=JobLinks(self=base, events=f"{base}/events", cancel=f"{base}/cancel", files=f"{base}/files"),
        )


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
        return cls(id=e.id, created_at=e.created_at, kind=e.kind, stage=e.stage, message=e.message, data=e.data)


class EventPage(BaseModel):
    items: list[EventOut]
    job_status: str


class JobCreated(JobOut):
    webhook_secret: str | None = Field(
        default=None, description="the generated secret of the request's webhook: returned once, here")
