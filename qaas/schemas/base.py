"""The base of every request body the API accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def _nul_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string holding U+0000 (for a key, the object holding it), or None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\x00" in k:
                return path  # never echo the bad key itself into the error
            here = f"{path}.{k}" if path else str(k)
            found = _nul_path(v, here)
            if found is not None:
                return found
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _nul_path(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


class RequestModel(BaseModel):
    """Unknown fields are refused, and no text may hold U+0000: JSON can carry it, PostgreSQL text and
    JSONB cannot, so it is refused here, naming the field, rather than failing at INSERT time."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data: Any) -> Any:
        where = _nul_path(data)
        if where is not None:
            raise ValueError(f"{where or 'body'}: text must not contain the NUL character (U+0000)")
        return data
