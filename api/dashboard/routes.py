"""Dashboard pages under /dashboard: sign-in, the jobs list, a job's page, the submit form.

Server-rendered (Jinja2); the page script (static/dashboard.js) only makes them live: it follows
Server-Sent Events (the per-owner list stream below, and the job's own event stream) and falls back
to polling small JSON endpoints. Business rules stay in the jobs service and job store: the routes
here parse forms, check the session and CSRF token, call them, and render.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from qaas import __version__, job_store
from qaas.api.dashboard import auth, loss_curve, views
from qaas.api.deps import Caller, SessionDep, SettingsDep, authenticate_key
from qaas.api.jobs import endpoints as job_endpoints
from qaas.api.jobs import service
from qaas.api.jobs.schemas import EventOut
from qaas.api.problems import Problem, validation_errors
from qaas.db.models import TERMINAL_STATUSES, Job, JobStatus, utcnow
from qaas.db.session import session_scope
from qaas.schemas.job_request import JobRequest
from qaas.schemas.requests import parse_request

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["version"] = __version__
templates.env.filters["duration"] = views.duration

router = APIRouter(prefix="/dashboard", include_in_schema=False)

PAGE_SIZE = 25
LIST_STREAM_POLL_S = 1.0
LIST_STREAM_MAX_S = 300.0  # the browser reconnects (with Last-Event-ID) after this
KEEPALIVE_S = 15.0

NOTICES = {
    "submitted": "Job submitted.",  # true however far the job has got when the page is seen again
    "cancel-requested": "Cancellation requested: a queued job stops at once, a running one as soon as its worker stops it.",
    "already-finished": "That job had already finished; nothing to cancel.",
    "retried": "Submitted again as a new job with the same request.",
    "not-retryable": "Only failed or cancelled jobs can be retried.",
    "signed-out": "You are signed out.",
}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# --- helpers --------------------------------------------------------------------------------------


def _secure(resp: Response, *, cache: bool = False) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"
    if not cache:
        resp.headers["Cache-Control"] = "no-store"
    return resp


def render(request: Request, name: str, context: dict[str, Any], *, dash: auth.DashboardSession | None = None,
           status: int = 200) -> Response:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    ctx = {"dash": dash, "csrf": dash.csrf_token if dash else None, "notice": notice, **context}
    return _secure(templates.TemplateResponse(request, name, ctx, status_code=status))


def _require(request: Request, db, settings, *, api: bool = False) -> auth.DashboardSession:
    dash = auth.current_session(request, db, settings)
    if dash is None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise auth.LoginRequired(None if api else path)
    return dash


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _job_or_404(db, job_id: str, owner: str) -> Job | None:
    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        return None
    return job_store.get_job(db, jid, owner)


def _not_found(request: Request, dash: auth.DashboardSession) -> Response:
    return render(request, "not_found.html", {"title": "Not found", "what": "job"}, dash=dash, status=404)


def is_page_request(request: Request) -> bool:
    """A browser navigating to a dashboard page (not the page script asking for JSON or a stream)."""
    accept = request.headers.get("accept", "")
    return (request.url.path.startswith("/dashboard") and not request.url.path.startswith("/dashboard/static/")
            and "application/json" not in accept and "text/event-stream" not in accept)


ERROR_TITLES = {404: "Not found", 409: "Not available", 413: "Too large", 422: "Not valid", 429: "Too many requests",
                503: "Unavailable"}


def error_page(request: Request, status: int, headers: dict[str, str] | None = None) -> Response:
    """The HTML page for an error of a dashboard URL (signed in: with the navigation)."""
    from sqlalchemy.exc import SQLAlchemyError

    from qaas.db.session import get_sessionmaker

    settings = request.app.state.settings
    try:
        with get_sessionmaker(settings.resolved_database_url)() as db:
            dash = auth.current_session(request, db, settings)
    except SQLAlchemyError:  # the database is what failed (a 503): the page still says so, without the menu
        dash = None
    # A wrong method on a page URL is, for a person, a page that is not there.
    status = 404 if status == 405 else status
    resp = render(request, "not_found.html", {"title": ERROR_TITLES.get(status, "Error"), "what": "page",
                                              "path": request.url.path, "status": status}, dash=dash, status=status)
    resp.headers.update(headers or {})
    return resp


def _row_html(r: views.Row, csrf: str) -> str:
    return templates.get_template("_row.html").render(r=r, csrf=csrf)


# --- sign-in --------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home() -> RedirectResponse:
    return _redirect("/dashboard/jobs")


@router.get("/login")
def login_form(request: Request, db: SessionDep, settings: SettingsDep, next: str | None = None) -> Response:
    if auth.current_session(request, db, settings) is not None:
        return _redirect(auth.safe_next(next))
    token = auth.new_login_csrf()
    resp = render(request, "login.html", {"title": "Sign in", "login_csrf": token, "next": auth.safe_next(next)})
    resp.set_cookie(auth.LOGIN_CSRF_COOKIE, token, max_age=3600, **auth.cookie_flags(request))
    return resp


@router.post("/login")
def login(
    request: Request, db: SessionDep, settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    auth.check_login_csrf(request, csrf_token)
    caller = authenticate_key(db, settings, api_key.strip()) if api_key.strip() else None
    if caller is None:
        token = auth.new_login_csrf()
        resp = render(request, "login.html", {
            "title": "Sign in", "login_csrf": token, "next": auth.safe_next(next),
            "error": "That API key is not valid or was revoked." if api_key.strip() else "Enter an API key.",
        }, status=401)
        resp.set_cookie(auth.LOGIN_CSRF_COOKIE, token, max_age=3600, **auth.cookie_flags(request))
        return resp
    resp = _redirect(auth.safe_next(next))
    resp.set_cookie(auth.SESSION_COOKIE, auth.make_session_cookie(settings, caller.owner, caller.key_id),
                    max_age=auth.SESSION_TTL_S, **auth.cookie_flags(request))
    resp.delete_cookie(auth.LOGIN_CSRF_COOKIE, path=auth.COOKIE_PATH)
    return _secure(resp)


@router.post("/logout")
def logout(request: Request, db: SessionDep, settings: SettingsDep,
           csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    dash = auth.current_session(request, db, settings)
    if dash is not None:
        auth.check_csrf(request, dash, csrf_token)
    resp = _redirect("/dashboard/login?notice=signed-out")
    resp.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict")
    return _secure(resp)


# --- the jobs list --------------------------------------------------------------------------------


def _status_filter(status: str | None) -> str | None:
    return status if status in views.STATUSES else None


@router.get("/jobs")
def jobs_page(request: Request, db: SessionDep, settings: SettingsDep,
              status: str | None = None, cursor: Annotated[str | None, Query(max_length=200)] = None) -> Response:
    dash = _require(request, db, settings)
    status = _status_filter(status)
    now = utcnow()
    bad_cursor = False
    try:
        page = job_store.list_jobs(db, dash.owner, status=status, limit=PAGE_SIZE, cursor=cursor)
    except (ValueError, UnicodeDecodeError):
        bad_cursor, cursor = True, None
        page = job_store.list_jobs(db, dash.owner, status=status, limit=PAGE_SIZE, cursor=None)
    counts = status_counts(db, dash.owner)
    return render(request, "jobs.html", {
        "title": "Jobs", "rows": views.rows(db, page.items, settings.model_roots), "next_cursor": page.next_cursor,
        "status": status, "statuses": views.STATUSES, "counts": counts, "first_page": cursor is None,
        "since": views.iso(now), "bad_cursor": bad_cursor,
    }, dash=dash)


def status_counts(db, owner: str) -> dict[str, int]:
    """The owner's jobs per state, every state listed."""
    return {**{s: 0 for s in views.STATUSES}, **job_store.status_counts(db, owner)}


def _parse_since(raw: str | None) -> dt.datetime:
    if raw:
        try:
            when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    return utcnow()


def _changes(settings, owner: str, key_id: str, since: dt.datetime, csrf: str) -> tuple[list[dict], dt.datetime, bool]:
    with session_scope(settings.resolved_database_url) as s:
        if not auth.key_still_valid(s, owner, key_id):
            return [], since, False
        jobs = views.changed_jobs(s, owner, since)
        out = []
        counts = status_counts(s, owner) if jobs else None
        for r, j in zip(views.rows(s, jobs, settings.model_roots), jobs):
            out.append({**r.as_json(), "html": _row_html(r, csrf), "counts": counts})
            since = max(since, j.updated_at)
        return out, since, True


@router.get("/jobs.json")
def jobs_json(request: Request, db: SessionDep, settings: SettingsDep, since: str | None = None) -> Response:
    """Polling fallback of the live list: the caller's jobs changed since `since`, with their rows."""
    dash = _require(request, db, settings, api=True)
    rows, now, _ = _changes(settings, dash.owner, dash.key_id, _parse_since(since), dash.csrf_token)
    return _secure(JSONResponse({"since": views.iso(now), "rows": rows}))


@router.get("/jobs/stream")
def jobs_stream(request: Request, db: SessionDep, settings: SettingsDep, since: str | None = None) -> Response:
    """Server-Sent Events: one `job` event per change to any of the caller's jobs (rows re-rendered)."""
    dash = _require(request, db, settings, api=True)
    start = _parse_since(request.headers.get("last-event-id") or since)
    db.close()  # the stream opens short sessions of its own
    gen = _list_stream(settings, dash, start, request)
    return _secure(StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}))


async def _list_stream(settings, dash: auth.DashboardSession, since: dt.datetime, request: Request):
    yield "retry: 2000\n\n"
    sent: dict[str, tuple] = {}
    started = asyncio.get_running_loop().time()
    idle = 0.0
    while True:
        rows, since, ok = await run_in_threadpool(_changes, settings, dash.owner, dash.key_id, since, dash.csrf_token)
        if not ok:
            yield "event: signed-out\ndata: {}\n\n"
            return
        for r in rows:
            fp = (r["status"], r["stage"], round(r["progress"], 4), r["progress_message"], r["worker"],
                  r["cancel_requested"], r["finished_iso"], r["stage_started_iso"])
            if sent.get(r["id"]) == fp:
                continue
            sent[r["id"]] = fp
            idle = 0.0
            yield f"id: {views.iso(since)}\nevent: job\ndata: {json.dumps(r)}\n\n"
        if await request.is_disconnected():
            return
        if asyncio.get_running_loop().time() - started > LIST_STREAM_MAX_S:
            return
        await asyncio.sleep(LIST_STREAM_POLL_S)
        idle += LIST_STREAM_POLL_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"


# --- submit ---------------------------------------------------------------------------------------

METHODS = {"gptq": "GPTQ", "awq": "AWQ (4-bit, GEMM)", "nf4": "bitsandbytes NF4 (4-bit)",
           "fp4": "bitsandbytes FP4 (4-bit)", "int8": "bitsandbytes LLM.int8 (8-bit)",
           "gguf": "GGUF (llama.cpp, Ollama, LM Studio)", "ct": "compressed-tensors (FP8, INT8, W4A16: vLLM / SGLang)"}
FORM_DEFAULTS = {"model": "", "revision": "", "method": "nf4", "bits": "4", "group_size": "128", "dataset": "",
                 "double_quant": False, "compute_dtype": "", "desc_act": False, "sym": True, "evaluate": True,
                 "eval_max_windows": "", "priority": "0", "push_repo": "", "push_private": True,
                 "webhook_url": "", "advanced": "", "gguf_types": "Q4_K_M, Q8_0", "ct_scheme": "FP8_DYNAMIC",
                 "ct_weights": "rtn", "ct_group_size": "", "ct_dataset": "", "ct_smoothing": ""}
# Request fields -> the form input that sets them (for errors shown beside their input).
FIELD_INPUTS = {"model": "model", "model.id": "model", "model.path": "model", "model.revision": "revision",
                "quantization_config.bits": "bits", "quantization_config.group_size": "group_size",
                "quantization_config.dataset": "dataset", "quantization_config.bnb_4bit_compute_dtype": "compute_dtype",
                "quantization_config.types": "gguf_types",
                "options.eval_max_windows": "eval_max_windows", "options.priority": "priority",
                "push_to_hub.repo_id": "push_repo", "webhook.url": "webhook_url", "advanced": "advanced",
                "quantization_config.scheme": "ct_scheme", "quantization_config.weights": "ct_weights",
                "quantization_config.smoothing_strength": "ct_smoothing"}


def _int_or_raw(v: str) -> Any:
    v = v.strip()
    return int(v) if v.lstrip("-").isdigit() else v


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def build_request(values: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The form as a JobRequest body (validated afterwards by the same model as the API)."""
    req: dict[str, Any] = {}
    model = values["model"].strip()
    if model.startswith("/"):
        req["model"] = {"path": model}
    elif model:
        req["model"] = {"id": model, **({"revision": values["revision"].strip()} if values["revision"].strip() else {})}
    method = values["method"]
    if method == "gptq":
        qc: dict[str, Any] = {"quant_method": "gptq", "bits": _int_or_raw(values["bits"]), "desc_act": values["desc_act"],
                              "sym": values["sym"]}
        if values["group_size"].strip():
            qc["group_size"] = _int_or_raw(values["group_size"])
        if values["dataset"].strip():
            qc["dataset"] = values["dataset"].strip()
    elif method == "awq":  # 4-bit only: bits is AwqConfig's default
        qc = {"quant_method": "awq"}
        if values["group_size"].strip():
            qc["group_size"] = _int_or_raw(values["group_size"])
        if values["dataset"].strip():
            qc["dataset"] = values["dataset"].strip()
    elif method in ("nf4", "fp4"):
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": method,
              "bnb_4bit_use_double_quant": values["double_quant"]}
        if values["compute_dtype"]:
            qc["bnb_4bit_compute_dtype"] = values["compute_dtype"]
    elif method == "int8":
        qc = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    elif method == "gguf":
        qc = {"quant_method": "gguf", "types": [t.strip() for t in values["gguf_types"].replace(",", " ").split()]}
    elif method == "ct":  # llm-compressor's preset schemes; empty inputs leave the rules' defaults
        qc = {"quant_method": "compressed-tensors", "scheme": values["ct_scheme"]}
        if values["ct_weights"]:
            qc["weights"] = values["ct_weights"]
        for key, name in (("group_size", "ct_group_size"), ("smoothing_strength", "ct_smoothing")):
            if values[name].strip():
                raw = values[name].strip()
                try:
                    qc[key] = int(raw) if key == "group_size" else float(raw)
                except ValueError:
                    qc[key] = raw  # the rules name the field
        if values["ct_dataset"].strip():
            qc["dataset"] = values["ct_dataset"].strip()
    else:
        qc = {"quant_method": method}
    req["quantization_config"] = qc
    options: dict[str, Any] = {"evaluate": values["evaluate"]}
    if values["eval_max_windows"].strip():
        options["eval_max_windows"] = _int_or_raw(values["eval_max_windows"])
    if values["priority"].strip():
        options["priority"] = _int_or_raw(values["priority"])
    req["options"] = options
    if values["push_repo"].strip():
        req["push_to_hub"] = {"repo_id": values["push_repo"].strip(), "private": values["push_private"]}
    if values["webhook_url"].strip():
        req["webhook"] = {"url": values["webhook_url"].strip()}
    errors: list[dict[str, str]] = []
    if values["advanced"].strip():
        try:
            extra = json.loads(values["advanced"])
        except ValueError as exc:
            errors.append({"field": "advanced", "message": f"not valid JSON: {exc}"})
        else:
            if isinstance(extra, dict):
                _merge(req, extra)
            else:
                errors.append({"field": "advanced", "message": "must be a JSON object, e.g. {\"options\": {...}}"})
    return req, errors


def _without_secrets(advanced: str) -> str:
    """The advanced JSON to show back after an error, without an hf_token (never echoed into a page)."""
    if "hf_token" not in advanced:
        return advanced
    try:
        data = json.loads(advanced)
    except ValueError:
        return ""
    if isinstance(data, dict):
        data.pop("hf_token", None)
        return json.dumps(data, indent=2) if data else ""
    return ""


def _submit_page(request: Request, dash, values: dict, errors: list[dict[str, str]] | None = None, status: int = 200):
    errors = errors or []
    values = {**values, "advanced": _without_secrets(values.get("advanced", ""))}
    by_input: dict[str, list[str]] = {}
    for e in errors:
        # an item's error (quantization_config.types.1) goes beside its list's input
        where = FIELD_INPUTS.get(e["field"]) or FIELD_INPUTS.get(e["field"].rsplit(".", 1)[0], "advanced")
        by_input.setdefault(where, []).append(f"{e['field']}: {e['message']}")
    return render(request, "submit.html", {
        "title": "Submit a job", "v": values, "methods": METHODS, "errors": errors, "field_errors": by_input,
        "idempotency_key": secrets.token_urlsafe(16),
    }, dash=dash, status=status)


@router.get("/jobs/new")
def submit_form(request: Request, db: SessionDep, settings: SettingsDep) -> Response:
    dash = _require(request, db, settings)
    return _submit_page(request, dash, dict(FORM_DEFAULTS))


@router.post("/jobs")
async def submit_job(request: Request, db: SessionDep, settings: SettingsDep) -> Response:
    dash = await run_in_threadpool(_require, request, db, settings)
    form = await request.form()
    auth.check_csrf(request, dash, str(form.get("csrf_token") or ""))
    values = dict(FORM_DEFAULTS)
    for k, default in FORM_DEFAULTS.items():
        if isinstance(default, bool):
            values[k] = form.get(k) in ("on", "true", "1")
        else:
            values[k] = str(form.get(k) or "")[:100_000]
    if values["method"] not in METHODS:
        values["method"] = "nf4"
    body, errors = build_request(values)
    if errors:
        return _submit_page(request, dash, values, errors, status=422)
    try:
        req = JobRequest.model_validate(body)
    except ValidationError as exc:
        return _submit_page(request, dash, values, validation_errors(exc), status=422)
    idem = str(form.get("idempotency_key") or "") or None
    try:
        submission = await run_in_threadpool(service.submit, db, settings, dash.owner, req, idem)
    except Problem as exc:
        if exc.status != 422:
            raise
        return _submit_page(request, dash, values, exc.errors or [{"field": "body", "message": exc.detail or ""}], 422)
    return _redirect(f"/dashboard/jobs/{submission.job_id}?notice=submitted")


# --- one job --------------------------------------------------------------------------------------

EVENTS_SHOWN = 300


def _job_context(db, job: Job, roots) -> dict[str, Any]:
    events = job_store.list_events(db, job.id, limit=20000)
    now = utcnow()
    (r,) = views.rows(db, [job], roots)
    return {
        "job": job, "r": r, "events": [EventOut.from_event(e) for e in events[-EVENTS_SHOWN:]],
        "events_total": len(events), "last_event_id": events[-1].id if events else 0,
        "timeline": views.timeline(job, events, now), "layer_errors": views.layer_errors(events, job.result),
        "loss_svg": loss_curve.svg(loss_curve.points(events, job.result)) if job.kind == "finetune" else None,
        "finetune": loss_curve.summary(job.result if job.status == "succeeded" else None),
        "result": views.result_view(job), "deliveries": views.list_deliveries(db, job.id),
        "request_json": json.dumps(job.request, indent=2, sort_keys=False),
        "webhook_url": ((job.request or {}).get("webhook") or {}).get("url"),
        "retryable": job.status in ("failed", "cancelled"),
        "cancellable": job.status not in TERMINAL_STATUSES,
        "now_iso": views.iso(now),
    }


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, db: SessionDep, settings: SettingsDep) -> Response:
    dash = _require(request, db, settings)
    job = _job_or_404(db, job_id, dash.owner)
    if job is None:
        return _not_found(request, dash)
    ctx = _job_context(db, job, settings.model_roots)
    return render(request, "job.html", {"title": f"Job {str(job.id)[:8]}", **ctx}, dash=dash)


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: str, db: SessionDep, settings: SettingsDep) -> Response:
    """The status, progress, timeline and outcome panel, for the page script to swap in."""
    dash = _require(request, db, settings, api=True)
    job = _job_or_404(db, job_id, dash.owner)
    if job is None:
        return _secure(HTMLResponse("not found", status_code=404))
    ctx = _job_context(db, job, settings.model_roots)
    html = templates.get_template("_live.html").render(csrf=dash.csrf_token, **ctx)
    return _secure(HTMLResponse(html, headers={"X-Job-Status": job.status}))


@router.get("/jobs/{job_id}/events")
def job_events(request: Request, job_id: str, db: SessionDep, settings: SettingsDep,
               after: Annotated[int, Query(ge=0)] = 0) -> Response:
    """The job's events for the page: SSE (Accept: text/event-stream) or a JSON page for polling."""
    dash = _require(request, db, settings, api=True)
    job = _job_or_404(db, job_id, dash.owner)
    if job is None:
        return _secure(JSONResponse({"detail": "no such job"}, status_code=404))
    if "text/event-stream" not in request.headers.get("accept", ""):
        events = job_store.list_events(db, job.id, after_id=after, limit=500)
        return _secure(JSONResponse({"items": [EventOut.from_event(e).model_dump(mode="json") for e in events],
                                     "job_status": job.status}))
    last = request.headers.get("last-event-id", "")
    start = max(after, int(last)) if last.isdigit() else after
    db.close()
    # The same generator as GET /v1/jobs/{id}/events: one format for the API and the page.
    gen = job_endpoints._sse(settings.resolved_database_url, job.id, owner=dash.owner, after=start, request=request)
    return _secure(StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}))


@router.get("/jobs/{job_id}/files.tar")
def job_archive(request: Request, job_id: str, db: SessionDep, settings: SettingsDep):
    dash = _require(request, db, settings)
    return job_endpoints.download_archive(job_id, Caller(dash.owner, dash.key_id), db, settings)


@router.get("/jobs/{job_id}/files/{name:path}")
def job_file(request: Request, job_id: str, name: str, db: SessionDep, settings: SettingsDep):
    dash = _require(request, db, settings)
    return job_endpoints.download_file(job_id, name, Caller(dash.owner, dash.key_id), db, settings)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str, db: SessionDep, settings: SettingsDep,
               csrf_token: Annotated[str, Form(max_length=200)] = "",
               back: Annotated[str, Form(max_length=2000)] = "") -> Response:
    dash = _require(request, db, settings)
    auth.check_csrf(request, dash, csrf_token)
    try:
        jid = uuid.UUID(job_id)
    except ValueError:
        return _not_found(request, dash)
    dest = auth.safe_next(back) if back else f"/dashboard/jobs/{jid}"
    sep = "&" if "?" in dest else "?"
    try:
        service.cancel(db, settings, dash.owner, jid)  # the API's cancel: one path
    except Problem as exc:
        if exc.status == 404:
            return _not_found(request, dash)
        return _redirect(f"{dest}{sep}notice=already-finished")
    return _redirect(f"{dest}{sep}notice=cancel-requested")


@router.post("/jobs/{job_id}/retry")
def retry_job(request: Request, job_id: str, db: SessionDep, settings: SettingsDep,
              csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Submit the same request again as a new job (secrets are not stored, so a Hub token must be sent anew)."""
    dash = _require(request, db, settings)
    auth.check_csrf(request, dash, csrf_token)
    job = _job_or_404(db, job_id, dash.owner)
    if job is None:
        return _not_found(request, dash)
    if job.status not in (JobStatus.failed.value, JobStatus.cancelled.value):
        return _redirect(f"/dashboard/jobs/{job.id}?notice=not-retryable")
    try:
        req = parse_request({**job.request, "kind": job.kind})
        submission = service.submit(db, settings, dash.owner, req, None)
    except (ValidationError, Problem) as exc:
        errors = validation_errors(exc) if isinstance(exc, ValidationError) else (exc.errors or [])
        ctx = _job_context(db, job, settings.model_roots)
        return render(request, "job.html", {"title": f"Job {str(job.id)[:8]}", "retry_errors": errors, **ctx},
                      dash=dash, status=422)
    return _redirect(f"/dashboard/jobs/{submission.job_id}?notice=retried")
