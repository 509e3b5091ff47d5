"""Saving, describing and forgetting an owner's Hub token (sessions passed in).

The token is encrypted under the server secret and never returned; jobs that bring no `hf_token` of
their own use it (`qaas.job_store.hub_token_encrypted`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from qaas.db.models import HubCredential, utcnow
from qaas.security import encrypt_secret
from qaas.settings import Settings


def save(session: Session, settings: Settings, owner: str, token: str) -> None:
    enc = encrypt_secret(token, settings.secret_key.get_secret_value())
    cred = session.get(HubCredential, owner)
    if cred is None:
        session.add(HubCredential(owner=owner, token_encrypted=enc, updated_at=utcnow()))
    else:
        cred.token_encrypted, cred.updated_at = enc, utcnow()
    session.commit()


def saved_at(session: Session, owner: str) -> dt.datetime | None:
    """When the owner's token was saved; None if there is none."""
    cred = session.get(HubCredential, owner)
    return cred.updated_at if cred is not None else None


def forget(session: Session, owner: str) -> None:
    cred = session.get(HubCredential, owner)
    if cred is not None:
        session.delete(cred)
        session.commit()
