"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A secret is `whsec_` + base64 of 24..64 random bytes; the signed content is `{msg_id}.{timestamp}.{body}`;
the `webhook-signature` header is `v1,<base64 HMAC-SHA256>`, space-separated when several secrets are live
(rotation: the old and the new secret both sign until the receiver has switched).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Iterable, Mapping

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class InvalidSignature(Exception):
    """The webhook headers or signature do not verify."""


def generate_secret(nbytes: int = 32) -> str:
    if not 24 <= nbytes <= 64:
        raise ValueError("Standard Webhooks secrets are 24 to 64 bytes")
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key of a `whsec_...` secret (raw bytes are taken as the key itself)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        raw = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError("webhook secret is not valid base64") from e
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def _one(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret_key(secret), f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sign(secret: str | bytes | Iterable[str | bytes], msg_id: str, timestamp: int, body: bytes | str) -> str:
    """`v1,<sig>` for one secret; `v1,<sig1> v1,<sig2>` for several (rotation)."""
    if isinstance(secret, (str, bytes)):
        secret = [secret]
    sigs = [_one(s, msg_id, timestamp, _as_bytes(body)) for s in secret]
    if not sigs:
        raise ValueError("no webhook secret to sign with")
    return " ".join(sigs)


def signature_headers(secrets: str | Iterable[str], msg_id: str, body: bytes | str, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secrets, msg_id, ts, body)}


def verify(
    secret: str | bytes | Iterable[str | bytes],
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise InvalidSignature unless one `v1` signature matches one of the secrets within the time tolerance."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, ts_text, sig_header = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and ts_text and sig_header):
        raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        ts = int(ts_text)
    except ValueError:
        raise InvalidSignature("webhook-timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance_s:
        raise InvalidSignature("webhook-timestamp outside the tolerance window")
    candidates = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    expected = {_one(s, msg_id, ts, _as_bytes(body)).split(",", 1)[1] for s in candidates}
    for part in sig_header.split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and any(hmac.compare_digest(sig, e) for e in expected):
            return
    raise InvalidSignature("no matching signature")
