"""Standard Webhooks signatures (https://www.standardwebhooks.com/), made by the `standardwebhooks` package.

A secret is `whsec_` + base64 of 24..64 random bytes; the signed content is `{msg_id}.{timestamp}.{body}`;
the `webhook-signature` header is `v1,<base64 HMAC-SHA256>`, space-separated when several secrets are live
(rotation: the old and the new secret both sign until the receiver has switched).
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets as _secrets
import time
from collections.abc import Iterable

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def generate_secret(nbytes: int = 32) -> str:
    if not 24 <= nbytes <= 64:
        raise ValueError("Standard Webhooks secrets are 24 to 64 bytes")
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def sign(secrets: str | Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` for one secret; `v1,<sig1> v1,<sig2>` for several (rotation)."""
    if isinstance(secrets, str):
        secrets = [secrets]
    when = dt.datetime.fromtimestamp(int(timestamp), tz=dt.UTC)
    signatures = [Webhook(s).sign(msg_id, when, body.decode()) for s in secrets]
    if not signatures:
        raise ValueError("no webhook secret to sign with")
    return " ".join(signatures)


def signature_headers(secrets: str | Iterable[str], msg_id: str, body: bytes,
                      timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secrets, msg_id, ts, body)}
