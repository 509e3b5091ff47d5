"""The job dashboard: server-rendered pages under /dashboard, signed in with an API key.

`install(app)` adds the routes, the vendored static files and the two exception handlers that
turn "not signed in" into a redirect (pages) or a 401 (streams, JSON), and a bad CSRF token into 403.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    from qaas.api.dashboard import auth
    from qaas.api.dashboard.routes import render, router
    from qaas.api.problems import problem_response

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=str(STATIC)), name="dashboard-static")

    @app.exception_handler(auth.LoginRequired)
    async def _login_required(request: Request, exc: auth.LoginRequired):
        if exc.next_path is None:
            return problem_response(401, "Unauthorized", "sign in to the dashboard first", slug="unauthorized",
                                    instance=request.url.path)
        return RedirectResponse(f"/dashboard/login?next={quote(exc.next_path, safe='')}", status_code=303)

    @app.exception_handler(auth.CsrfFailed)
    async def _csrf_failed(request: Request, exc: auth.CsrfFailed):
        return render(request, "error.html", {
            "title": "Form expired",
            "message": "This form has expired or was sent from another site. Go back, reload the page and try again.",
        }, status=403)
