"""Dashboard sign-in: a signed, expiring session cookie, and CSRF tokens bound to it.

The browser signs in once with an API key (a POST form). The key is checked with the API's own
`authenticate_key` and then forgotten: the cookie holds only `{owner, key id, expiry, nonce}` and an
HMAC over them under a key derived from the server secret. Every request re-checks that the key id
still exists, belongs to that owner and is not revoked, so revoking the key signs its sessions out.

The cookie is HttpOnly, SameSite=Strict, Secure on https, Path=/dashboard. State-changing forms also
carry a CSRF token, HMAC(csrf key, session nonce), checked in constant time; the sign-in form, which
has no session yet, uses a double-submit cookie instead. POSTs whose Origin names another site are
refused as well.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from qaas.db.models import ApiKey
from qaas.settings import Settings

SESSION_COOKIE = "qaas_session"
LOGIN_CSRF_COOKIE = "qaas_login_csrf"
COOKIE_PATH = "/dashboard"
SESSION_TTL_S = 12 * 3600


class LoginRequired(Exception):
    """No valid session: pages redirect to the sign-in form, JSON and streams answer 401."""

    def __init__(self, next_path: str | None = None) -> None:
        super().__init__("sign in required")
        self.next_path = next_path


class CsrfFailed(Exception):
    """A state-changing request without a valid CSRF token (or from another origin)."""


@dataclass(frozen=True)
class DashboardSession:
    owner: str
    key_id: str
    nonce: str
    expires: int
    csrf_token: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _derived(settings: Settings, purpose: str) -> bytes:
    # Separate keys per purpose: a session signature can never pass as a CSRF token or an API-key hash.
    return hmac.new(settings.secret_key.get_secret_value().encode(), f"qaas-dashboard-{purpose}-v1".encode(),
                    hashlib.sha256).digest()


def _csrf_for(settings: Settings, nonce: str) -> str:
    return _b64(hmac.new(_derived(settings, "csrf"), nonce.encode(), hashlib.sha256).digest())


def make_session_cookie(settings: Settings, owner: str, key_id: str, *, now: float | None = None) -> str:
    payload = {"o": owner, "k": key_id, "e": int((now or time.time()) + SESSION_TTL_S), "n": secrets.token_urlsafe(16)}
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    sig = _b64(hmac.new(_derived(settings, "session"), body.encode(), hashlib.sha256).digest())
    return f"{body}.{sig}"


def read_session_cookie(settings: Settings, value: str | None, *, now: float | None = None) -> DashboardSession | None:
    """The session in a cookie value, if its signature is good and it has not expired (key not yet checked)."""
    if not value or len(value) > 1024 or "." not in value:
        return None
    body, _, sig = value.partition(".")
    expected = _b64(hmac.new(_derived(settings, "session"), body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return None
    try:
        payload = json.loads(_unb64(body))
        owner, key_id, expires, nonce = str(payload["o"]), str(payload["k"]), int(payload["e"]), str(payload["n"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if expires < (now or time.time()):
        return None
    return DashboardSession(owner, key_id, nonce, expires, _csrf_for(settings, nonce))


def key_still_valid(session: Session, owner: str, key_id: str) -> bool:
    try:
        kid = uuid.UUID(key_id)
    except ValueError:
        return False
    row = session.execute(select(ApiKey.owner, ApiKey.revoked_at).where(ApiKey.id == kid)).first()
    return row is not None and row.owner == owner and row.revoked_at is None


def current_session(request: Request, db: Session, settings: Settings) -> DashboardSession | None:
    dash = read_session_cookie(settings, request.cookies.get(SESSION_COOKIE))
    if dash is None or not key_still_valid(db, dash.owner, dash.key_id):
        return None
    return dash


def cookie_flags(request: Request) -> dict:
    return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https", "path": COOKIE_PATH}


# --- CSRF -----------------------------------------------------------------------------------------


def check_origin(request: Request) -> None:
    """Refuse a POST whose Origin (or Referer) is another site; browsers send one on every form POST."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return  # non-browser clients; the token check below still applies
    parts = urlsplit(origin)
    if (parts.scheme, parts.netloc) != (request.url.scheme, request.url.netloc):
        raise CsrfFailed()


def check_csrf(request: Request, dash: DashboardSession, token: str | None) -> None:
    check_origin(request)
    if not token or not hmac.compare_digest(token.encode(), dash.csrf_token.encode()):
        raise CsrfFailed()


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def check_login_csrf(request: Request, token: str | None) -> None:
    check_origin(request)
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not token or not cookie or not hmac.compare_digest(token.encode(), cookie.encode()):
        raise CsrfFailed()


def safe_next(path: str | None) -> str:
    """Only a local dashboard path may be a post-sign-in destination (no open redirects)."""
    if path and path.startswith("/dashboard/") and not path.startswith("//") and "\\" not in path and "\n" not in path:
        return path
    return "/dashboard/jobs"
