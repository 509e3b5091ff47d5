"""HTTP routes of the jobs domain. Thin: parse, authorize, call the service, shape the answer."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic_core import to_json

from qaas.api.deps import CallerDep, SessionDep, SettingsDep, authenticate_request, get_app_settings
from qaas.api.jobs import files, reads, service
from qaas.api.jobs.schemas import EventPage, JobCreated, JobOut, JobPage
from qaas.api.problems import PROBLEM_JSON, Problem, ProblemDetails
from qaas.db.config import Database
from qaas import job_store
from qaas.db.models import TERMINAL_STATUSES, JobStatus
from qaas.schemas.requests import AnyJobRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS = {
    401: {"model": ProblemDetails, "content": {PROBLEM_JSON: {}}, "description": "missing or bad API key"},
    404: {"model": ProblemDetails, "content": {PROBLEM_JSON: {}}, "description": "no such job (or not yours)"},
    422: {"model": ProblemDetails, "content": {PROBLEM_JSON: {}}, "description": "invalid request"},
}


def _not_found() -> Problem:
    return Problem(404, "Not found", "no such job", slug="not-found")


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise _not_found()


@router.post("", status_code=202, response_model=JobCreated, operation_id="create_job", responses=_ERRORS)
async def create_job(
    body: AnyJobRequest,
    caller: CallerDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JobCreated:
    """Accept a quantization job (`kind` "quantize", the default) or a QLoRA fine-tuning job (`kind` "finetune"). The job is stored first, then queued; follow it at `Location`."""
    submission = await service.submit_async(settings, caller.owner, body, idempotency_key)
    headers = {"Location": f"/v1/jobs/{submission.job_id}"}
    if submission.replayed:
        headers["Idempotent-Replayed"] = "true"
    document = {**submission.document, "webhook_secret": submission.webhook_secret}
    return Response(to_json(document), status_code=202, media_type="application/json", headers=headers)


@router.get("", response_model=JobPage, operation_id="list_jobs", responses=_ERRORS)
async def list_jobs(
    caller: CallerDep,
    settings: SettingsDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    """Your jobs, newest first, a page at a time."""
    try:
        page = await reads.jobs_page(settings.database, caller.owner,
                                     status=status.value if status else None, limit=limit, cursor=cursor)
    except (ValueError, UnicodeDecodeError):
        raise Problem(422, "Invalid request", "cursor: not a cursor from this API", slug="validation-error",
                      errors=[{"field": "cursor", "message": "not a cursor from this API"}])
    return _json({"items": page.items, "next_cursor": page.next_cursor})


def _json(document) -> Response:
    # Documents from reads.py are serialized once, straight to JSON by pydantic-core (the encoder a model
    # uses: identical output); the response_model stays for the OpenAPI schema. Building and validating
    # the model first cost more than the database read.
    return Response(to_json(document), media_type="application/json")


@router.get("/{job_id}", response_model=JobOut, operation_id="get_job", responses=_ERRORS)
async def get_job(job_id: str, request: Request) -> JobOut:
    # The route status polls hit (when both the key and the document are cached, api/jobs/cached_status.py
    # answers before FastAPI with these same bytes): the caller and the settings are taken here, not as
    # dependencies (CallerDep, SettingsDep) -- FastAPI's dependency solving was a tenth of a status read's
    # CPU. The same function authenticates (deps.authenticate_request), so the answers cannot differ.
    settings = await get_app_settings(request)
    caller = await authenticate_request(request, settings)
    body = await reads.job_json(settings, _parse_id(job_id), caller.owner)
    if body is None:
        raise _not_found()
    return Response(body, media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, operation_id="cancel_job", responses=_ERRORS)
def cancel_job(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Cancel: a queued job at once, a running one as soon as its worker stops it."""
    return JobOut.from_job(service.cancel(session, settings, caller.owner, _parse_id(job_id)))


@router.get("/{job_id}/files", response_model=files.FileListing, operation_id="list_job_files", responses=_ERRORS)
def list_files(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> files.FileListing:
    """The output files of a succeeded job: name, size, sha256, URL; and the archive of them all."""
    job = job_store.get_job(session, _parse_id(job_id), caller.owner)
    return files.listing(job, files.output_files(settings, job), f"/v1/jobs/{job_id}")


@router.get(
    "/{job_id}/files.tar",
    operation_id="download_job_archive",
    responses={**_ERRORS, 200: {"content": {"application/x-tar": {}}, "description": "every output file, one tar"}},
)
def download_archive(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """The whole output as one tar archive, streamed as it is written."""
    job = job_store.get_job(session, _parse_id(job_id), caller.owner)
    out, root = files.output_files(settings, job), files.archive_root(job)
    return StreamingResponse(files.archive_chunks(root, out), media_type="application/x-tar", headers={
        "Content-Length": str(files.archive_size(root, out)),
        "Content-Disposition": f'attachment; filename="{root}.tar"'})


@router.get(
    "/{job_id}/files/{name:path}",
    operation_id="download_job_file",
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "the file"}},
)
def download_file(job_id: str, name: str, caller: CallerDep, session: SessionDep, settings: SettingsDep):
    """Download one output file of a succeeded job (streamed)."""
    job = job_store.get_job(session, _parse_id(job_id), caller.owner)
    f = files.output_file(settings, job, name)
    return FileResponse(f.path, filename=Path(f.name).name, media_type="application/octet-stream")


def _wants_sse(request: Request, stream: bool) -> bool:
    return stream or "text/event-stream" in request.headers.get("accept", "")


@router.get(
    "/{job_id}/events",
    response_model=EventPage,
    operation_id="list_job_events",
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON page, or an SSE stream"}},
)
async def job_events(
    job_id: str,
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, description="only events with a larger id")] = 0,
    stream: Annotated[bool, Query(description="Server-Sent Events (or send Accept: text/event-stream)")] = False,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
):
    """The job's timeline. As Server-Sent Events it follows the job live until it ends; resume with Last-Event-ID."""
    jid = _parse_id(job_id)
    db = settings.database
    if not _wants_sse(request, stream):
        got = await reads.events_after(db, jid, caller.owner, after)
        if got is None:
            raise _not_found()
        return _json({"items": got[1], "job_status": got[0]})
    if await reads.job_status(db, jid, caller.owner) is None:
        raise _not_found()
    start = after
    if last_event_id and last_event_id.isdigit():
        start = max(start, int(last_event_id))
    return StreamingResponse(
        _sse(db, jid, caller.owner, start, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(db: Database | str, job_id: uuid.UUID, owner: str, after: int, request: Request,
               keepalive_s: float = 15.0):
    yield "retry: 2000\n\n"
    idle = since_keepalive = 0.0
    while True:
        got = await reads.events_after(db, job_id, owner, after, limit=500)
        status, events = got if got is not None else (None, [])
        for e in events:
            after = e["id"]
            yield f"id: {e['id']}\nevent: {e['kind']}\ndata: {to_json(e).decode()}\n\n"
        if events:
            idle = 0.0
        if status is None or (status in TERMINAL_STATUSES and not events):
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        # Poll fast while the job is talking, slower while it is quiet (a job queued for an hour need not
        # cost two queries a second per watcher): 0.5 s, then 1 s after 5 s of silence, 2 s after 30 s.
        poll_s = 0.5 if idle < 5 else 1.0 if idle < 30 else 2.0
        await asyncio.sleep(poll_s)
        idle += poll_s
        since_keepalive += poll_s
        if since_keepalive >= keepalive_s:
            since_keepalive = 0.0
            yield ": keep-alive\n\n"
