"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error the API returns has `type`, `title`, `status` and `detail`; validation errors add
`errors: [{"field": "quantization_config.bits", "message": ...}]` naming each bad field.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from qaas.db.direct import DatabaseUnavailable

log = logging.getLogger("qaas.api")

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://qaas.dev/problems/"

# Tags pydantic puts in error locations for union members; they are not fields the user wrote.
_UNION_TAGS = {"HubModel", "LocalModel", "JobOutput", "QuantizeJob", "FinetuneJob"}
_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([a-z_][a-z0-9_.]*): ")


class FieldError(BaseModel):
    field: str
    message: str


class ProblemDetails(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


class Problem(Exception):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        slug: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.title, self.detail = status, title, detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.errors = errors
        self.headers = headers or {}


def invalid_field(field: str, message: str) -> Problem:
    """The 422 of a request whose `field` is wrong, naming it."""
    return Problem(422, "Invalid request", f"{field}: {message}", slug="validation-error",
                   errors=[{"field": field, "message": message}])


def problem_response(
    status: int, title: str, detail: str | None = None, *, slug: str | None = None,
    errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None, instance: str | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": _TYPE_BASE + (slug or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_of(loc: tuple[Any, ...], message: str) -> tuple[str, str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if p not in _UNION_TAGS and not p.startswith("function-")]
    # Model-level validators name their field at the start of the message ("dataset: ...").
    m = _FIELD_PREFIX.match(message)
    if m:
        message = message[m.end(0):]
        name = m.group(1)
        if not parts or parts[-1] != name:
            parts.append(name)
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return ".".join(parts) or "body", message


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            out.append({"field": "body", "message": "the body is not valid JSON"})
            continue
        field, message = _field_of(tuple(err.get("loc", ())), str(err.get("msg", "")))
        if err.get("type") == "extra_forbidden":
            message = "unknown field"
        elif err.get("type") == "missing":
            message = "field required"
        out.append({"field": field, "message": message})
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(exc.status, exc.title, exc.detail, slug=exc.slug, errors=exc.errors,
                                headers=exc.headers, instance=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem_response(422, "Invalid request", detail, slug="validation-error", errors=errors,
                                instance=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):
            # A body that is not even UTF-8 is as malformed as bad JSON: the same 422 naming the body.
            return problem_response(422, "Invalid request", "body: the body is not valid JSON (UTF-8)",
                                    slug="validation-error", instance=request.url.path,
                                    errors=[{"field": "body", "message": "the body is not valid JSON (UTF-8)"}])
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized", 413: "Request too large"}
        return problem_response(exc.status_code, titles.get(exc.status_code, "Error"), str(exc.detail),
                                headers=getattr(exc, "headers", None), instance=request.url.path)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(DatabaseUnavailable)  # the direct hot paths (qaas.db.direct)
    async def _db_down(request: Request, exc: Exception):
        if isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError) \
                and not exc.connection_invalidated:
            return await _internal(request, exc)  # a bug (bad SQL, schema drift), not an outage
        log.warning("database unavailable: %s", exc.__class__.__name__)
        return problem_response(503, "Service unavailable", "the database is unavailable; retry shortly",
                                slug="unavailable", headers={"Retry-After": "2"}, instance=request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error", "an unexpected error occurred", slug="internal",
                                instance=request.url.path)
