"""What `POST /v1/jobs` accepts: a quantization job (`kind` "quantize", the default) or a fine-tuning job
(`kind` "finetune"), chosen by `kind` so that a bad field is one error about that kind's field."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag, TypeAdapter

from qaas.schemas.finetune_request import FinetuneRequest
from qaas.schemas.job_request import JobRequest

KINDS = ("quantize", "finetune")


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("kind", "quantize")
        return {"quantize": "QuantizeJob", "finetune": "FinetuneJob"}.get(kind) if isinstance(kind, str) else None
    if isinstance(value, JobRequest):
        return "QuantizeJob"
    if isinstance(value, FinetuneRequest):
        return "FinetuneJob"
    return None


AnyJobRequest = Annotated[
    Annotated[JobRequest, Tag("QuantizeJob")] | Annotated[FinetuneRequest, Tag("FinetuneJob")],
    Discriminator(_kind, custom_error_type="job_kind",
                  custom_error_message="kind must be 'quantize' (the default) or 'finetune'"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyJobRequest)


def parse_request(data: Any) -> JobRequest | FinetuneRequest:
    """A stored or submitted request body as its request model (pydantic's ValidationError otherwise)."""
    return _ADAPTER.validate_python(data)


def kind_of(req: JobRequest | FinetuneRequest) -> str:
    return "finetune" if isinstance(req, FinetuneRequest) else "quantize"
