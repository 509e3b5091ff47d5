"""The job dashboard: server-rendered pages under /dashboard, signed in with an API key.

`install(app)` adds the routes, the vendored static files and the exception handlers that turn "not
signed in" into a redirect (pages) or a 401 (streams, JSON), a bad CSRF token into 403, and any other error
of a dashboard page (404 for a mistyped URL) into an HTML page; it runs after the API's problem handlers,
which it keeps for everything else.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    from qaas.api.dashboard import auth
    from qaas.api.dashboard.routes import error_page, is_page_request, render, router
    from qaas.api.problems import Problem, problem_response

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=str(STATIC)), name="dashboard-static")

    @app.exception_handler(auth.LoginRequired)
    async def _login_required(request: Request, exc: auth.LoginRequired):
        if exc.next_path is None:
            return problem_response(401, "Unauthorized", "sign in to the dashboard first", slug="unauthorized",
                                    instance=request.url.path)
        return RedirectResponse(f"/dashboard/login?next={quote(exc.next_path, safe='')}", status_code=303)

    # An error on a dashboard page a browser navigated to (a mistyped URL, a file no longer there) is a page,
    # not problem+json; the page script's fetches and streams ask for JSON or SSE and keep their answers.
    for exc_class in (StarletteHTTPException, Problem):
        previous = app.exception_handlers[exc_class]

        async def _page_error(request: Request, exc, previous=previous):
            if not is_page_request(request):
                return await previous(request, exc)
            status = exc.status_code if isinstance(exc, StarletteHTTPException) else exc.status
            return await run_in_threadpool(error_page, request, status, getattr(exc, "headers", None))

        app.add_exception_handler(exc_class, _page_error)

    @app.exception_handler(auth.CsrfFailed)
    async def _csrf_failed(request: Request, exc: auth.CsrfFailed):
        return render(request, "error.html", {
            "title": "Form expired",
            "message": "This form has expired or was sent from another site. Go back, reload the page and try again.",
        }, status=403)
