"""Shapes of the saved-Hub-token routes."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, SecretStr, field_validator

from qaas.schemas.base import RequestModel


class HubTokenIn(RequestModel):
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _token(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if not raw or len(raw) > 512 or any(c.isspace() for c in raw):
            raise ValueError("not a valid token")
        return v


class HubTokenStatus(BaseModel):
    configured: bool
    updated_at: dt.datetime | None
