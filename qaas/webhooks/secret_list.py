"""The signing secrets of a webhook, as they are stored and as they sign.

An account endpoint keeps a list of secrets, newest first, encrypted as one blob
(`WebhookEndpoint.secrets_encrypted`: Fernet under the server secret, of the JSON
`[{"secret": "whsec_...", "expires_at": unix seconds | null}, ...]`). Rotation puts a new secret in front
and gives the ones still valid an expiry `ROTATION_GRACE` away; until then deliveries carry one signature
per valid secret, so receivers can switch without losing a message. A request's own webhook has one
secret (`Job.webhook_secret_encrypted`), which never expires.

This module is the only one that reads or writes that format.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

from sqlalchemy.orm import Session

from qaas.db.models import Job, WebhookDelivery, WebhookEndpoint, utcnow
from qaas.security import decrypt_secret, encrypt_secret
from qaas.webhooks.signing import generate_secret

#: How long the previous secrets keep signing after a rotation.
ROTATION_GRACE = dt.timedelta(hours=24)


def _entries(blob: bytes, key: str) -> list[dict]:
    return json.loads(decrypt_secret(blob, key))


def _valid(entries: list[dict], now: dt.datetime) -> list[dict]:
    return [e for e in entries if not e.get("expires_at") or e["expires_at"] > now.timestamp()]


def new_list(key: str) -> tuple[str, bytes]:
    """A fresh secret and the encrypted list holding only it."""
    secret = generate_secret()
    return secret, encrypt_secret(json.dumps([{"secret": secret, "expires_at": None}]), key)


@dataclass(frozen=True)
class Rotated:
    secret: str
    blob: bytes
    #: Until then the previous secrets still sign.
    previous_expire_at: dt.datetime


def rotate(blob: bytes, key: str, *, now: dt.datetime | None = None) -> Rotated:
    """A new secret first; each one still valid expires ROTATION_GRACE from now (or sooner, if it already did)."""
    now = now or utcnow()
    expires_at = now + ROTATION_GRACE
    expires = expires_at.timestamp()
    old = [{**e, "expires_at": min(e.get("expires_at") or expires, expires)} for e in _valid(_entries(blob, key), now)]
    secret = generate_secret()
    new_blob = encrypt_secret(json.dumps([{"secret": secret, "expires_at": None}, *old]), key)
    return Rotated(secret, new_blob, expires_at)


def valid_secrets(blob: bytes, key: str, *, now: dt.datetime | None = None) -> list[str]:
    """The secrets that sign now, newest first (two during a rotation's grace period)."""
    return [e["secret"] for e in _valid(_entries(blob, key), now or utcnow())]


def secrets_for(session: Session, delivery: WebhookDelivery, key: str) -> list[str]:
    """The secrets a delivery is signed with: its endpoint's valid ones, or its job's own webhook secret."""
    if delivery.endpoint_id is not None:
        ep = session.get(WebhookEndpoint, delivery.endpoint_id)
        return valid_secrets(ep.secrets_encrypted, key) if ep is not None else []
    job = session.get(Job, delivery.job_id)
    if job is None or job.webhook_secret_encrypted is None:
        return []
    return [decrypt_secret(job.webhook_secret_encrypted, key)]
