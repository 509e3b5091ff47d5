"""Errors the engine raises on purpose: each carries a stable code and a message meant for the user.

Anything else that escapes the engine is a bug and is reported as `internal_error`.
"""

from __future__ import annotations


class EngineError(Exception):
    """A failure the user can understand and act on."""

    code = "engine_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field the problem is about, when there is one (e.g. "block_name_to_quantize").
        self.field = field


class InvalidConfig(EngineError):
    code = "invalid_config"


class SourceRejected(EngineError):
    """The source model cannot be used: pickle-only weights, remote code, not found, not a causal LM."""

    code = "source_rejected"


class SourceUnavailable(EngineError):
    """The source could not be fetched (network, auth): worth a retry or a token."""

    code = "source_unavailable"


class UnsupportedModel(EngineError):
    code = "unsupported_model"


class CalibrationDataError(EngineError):
    code = "calibration_data"


class OutOfSpace(EngineError):
    code = "no_space"
