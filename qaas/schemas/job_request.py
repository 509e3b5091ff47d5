"""The job request: what to quantize, how, and where the result goes.

`quantization_config` is the dict transformers writes: the field names and defaults of
`GPTQConfig` (`quant_method: "gptq"`) and `BitsAndBytesConfig` (`quant_method: "bitsandbytes"`),
so a user's existing config (including the output of `.to_dict()`) is a valid request. Its rules are
`qaas.quantization_rules`, the same the engine applies. Everything is validated up front: an impossible
combination is a 422 naming the field, never a job that fails an hour later.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BeforeValidator,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from qaas import quantization_rules
from qaas.quantization_rules import InvalidQuantizationConfig, engines, gpus
from qaas.quantization_rules.fields import FieldError
from qaas.quantization_rules.hub_ids import repo_id_problem
from qaas.schemas.base import RequestModel

# Branch/tag names or commit shas; no "..", no leading "-", no control characters or spaces.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")


class _Strict(RequestModel):
    pass


def _check_repo_id(value: str, what: str) -> str:
    problem = repo_id_problem(value)
    if problem:
        raise ValueError(f"{what} {problem}")
    return value


class HubModel(_Strict):
    """A model on the Hub (the server named by HF_ENDPOINT / QAAS_HUB_ENDPOINT)."""

    id: str = Field(max_length=200, examples=["HuggingFaceTB/SmolLM2-135M"])
    revision: str | None = Field(default=None, max_length=200, description="branch, tag or commit sha")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _check_repo_id(v, "model.id")

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and (not _REVISION.match(v) or ".." in v or "//" in v or v.endswith("/")):
            raise ValueError("model.revision must be a branch, tag or commit sha")
        return v


class LocalModel(_Strict):
    """A model directory on the worker's disk, under one of the operator's allowed roots."""

    path: str = Field(min_length=1, max_length=1024)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if "\x00" in v or any(ord(c) < 32 for c in v):
            raise ValueError("model.path contains control characters")
        return v


# --- quantization configs ------------------------------------------------------------------------


def _validated_quantization_config(value: Any) -> dict[str, Any]:
    """The one set of rules (`qaas.quantization_rules`), each broken rule an error at its own field."""
    try:
        return quantization_rules.normalize(value)
    except InvalidQuantizationConfig as exc:
        given = value if isinstance(value, dict) else {}
        raise ValidationError.from_exception_data("quantization_config", [
            InitErrorDetails(type=PydanticCustomError("quantization_rule", "{message}", {"message": e.message}),
                             loc=tuple(e.field.split(".")), input=given.get(e.field.split(".")[0]))
            for e in exc.errors
        ]) from None


#: A `GPTQConfig` or `BitsAndBytesConfig` dict (its `.to_dict()` is valid), normalized by the rules; its
#: OpenAPI description is written from the same rules.
QuantizationConfig = Annotated[
    dict[str, Any],
    BeforeValidator(_validated_quantization_config),
    WithJsonSchema(quantization_rules.json_schema()),
]


# --- delivery ------------------------------------------------------------------------------------


class PushToHub(_Strict):
    repo_id: str | None = Field(default=None, max_length=200, description="default: <owner>/<name>-<method>-<bits>")
    private: bool = True
    revision: str | None = Field(default=None, max_length=200)
    create_pr: bool = False
    commit_message: str | None = Field(default=None, max_length=1000)

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        return None if v is None else _check_repo_id(v, "push_to_hub.repo_id")

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        if v is not None and (not _REVISION.match(v) or ".." in v):
            raise ValueError("push_to_hub.revision must be a branch name")
        return v


class WebhookTarget(_Strict):
    url: AnyHttpUrl
    secret: SecretStr | None = Field(default=None, description="whsec_... ; generated and returned once if omitted")

    @field_validator("url")
    @classmethod
    def _url(cls, v: AnyHttpUrl) -> AnyHttpUrl:
        if len(str(v)) > 2048:
            raise ValueError("webhook.url is longer than 2048 characters")
        return v

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            from base64 import b64decode

            raw = v.get_secret_value()
            body = raw[len("whsec_"):] if raw.startswith("whsec_") else raw
            try:
                key = b64decode(body + "=" * (-len(body) % 4), validate=True)
            except ValueError:
                raise ValueError("webhook.secret must be whsec_ followed by base64 (24 to 64 bytes)")
            if not 24 <= len(key) <= 64:
                raise ValueError("webhook.secret must hold 24 to 64 bytes")
        return v


class JobOptions(_Strict):
    """Service options that are not part of the transformers config."""

    evaluate: bool = Field(default=True, description="measure perplexity before/after")
    eval_max_windows: int | None = Field(default=None, ge=1, le=1024)
    eval_text: str | list[str] | None = Field(
        default=None, description="the perplexity text (qaas.eval_text): a list of texts, the absolute path of a "
        ".txt/.jsonl file under the local roots, or a registered dataset name; default: the server's "
        "QAAS_EVAL_TEXT, else the packaged public-domain Shakespeare slice; never the calibration dataset itself")
    calibration_samples: int = Field(default=128, ge=1, le=4096,
                                     description="calibration sequences (GPTQ, AWQ) when the config has no nsamples")
    priority: int = Field(default=0, ge=0, le=9, description="higher runs first")
    time_limit_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    targets: list[str] = Field(default_factory=list, max_length=len(engines.NAMES), description=(
        "GPTQ: inference engines the output must load in besides transformers and GPTQModel "
        f"({', '.join(engines.NAMES)}); a config one of them refuses is a 422, and layers one of them "
        "cannot read stay in float16"))
    cpu_compatible: bool = Field(default=False, description=(
        "bitsandbytes 4-bit: keep in float the layers bitsandbytes' CPU kernels cannot run, so the output runs "
        "on the CPU too (default: exactly what transformers + bitsandbytes convert, as on a GPU)"))
    gpus: int = Field(default=1, ge=1, le=gpus.MOST, description=(
        f"GPUs of one worker host the job runs on ({', '.join(gpus.METHODS_ON_SEVERAL)}: calibration windows "
        "and Hessians split across them, the same output bytes as on one); at most the server's "
        "QAAS_MAX_GPUS_PER_JOB"))

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in engines.BY_NAME]
        if unknown:
            raise ValueError(f"unknown engine(s) {unknown}; known: {', '.join(engines.NAMES)}")
        return list(dict.fromkeys(v))

    @field_validator("eval_text", mode="before")
    @classmethod
    def _eval_text(cls, v: Any) -> Any:
        from qaas import eval_text
        from qaas.quantization_rules import FieldError

        try:
            return eval_text.check_value(v, "eval_text")
        except FieldError as exc:
            raise ValueError(exc.message) from None


def _hub_token(v: SecretStr | None) -> SecretStr | None:
    if v is not None:
        raw = v.get_secret_value()
        if not raw or len(raw) > 512 or any(c.isspace() for c in raw):
            raise ValueError("hf_token is not a valid token")
    return v


#: A job's own Hub token (every job kind): write-only, never returned or logged.
HubToken = Annotated[SecretStr | None, AfterValidator(_hub_token),
                     Field(description="write-only; never returned or logged")]


def rule_errors(title: str, errors: list[FieldError]) -> ValidationError:
    """Rules broken across fields, as one pydantic error per field (each one a 422 naming its field)."""
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("quantization_rule", "{message}", {"message": e.message}),
                         loc=tuple(e.field.split(".")), input=None)
        for e in errors
    ])


def _model_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        if "id" in value and "path" not in value:
            return "HubModel"
        if "path" in value and "id" not in value:
            return "LocalModel"
    elif isinstance(value, (HubModel, LocalModel)):
        return type(value).__name__
    return None


#: Chosen by the key given, so that a bad `id` is one error about the id, not three about the union.
SourceModel = Annotated[
    Annotated[HubModel, Tag("HubModel")] | Annotated[LocalModel, Tag("LocalModel")],
    Discriminator(_model_kind, custom_error_type="model_kind",
                  custom_error_message="give either id (a Hub model, with an optional revision) or path (a local "
                                       "directory), exactly one of the two"),
]


class JobRequest(_Strict):
    #: Quantization (the default); `"finetune"` is `qaas.schemas.finetune_request.FinetuneRequest`.
    kind: Literal["quantize"] = "quantize"
    model: SourceModel
    quantization_config: QuantizationConfig
    options: JobOptions = Field(default_factory=JobOptions)
    push_to_hub: PushToHub | None = None
    webhook: WebhookTarget | None = None
    hf_token: HubToken = None

    @model_validator(mode="after")
    def _options_fit_the_method(self) -> "JobRequest":
        """`options.targets` against the config (the engine table's rules), `cpu_compatible` for bitsandbytes,
        `gpus` for the methods that run on several."""
        errors: list[FieldError] = []
        if self.options.cpu_compatible and self.method != "bitsandbytes":
            errors.append(FieldError("options.cpu_compatible", "applies to bitsandbytes outputs only"))
        try:
            engines.check_targets(self.quantization_config, self.options.targets)
        except FieldError as exc:
            errors += [exc, FieldError("options.targets", exc.message)] if exc.field != "options.targets" else [exc]
        try:
            gpus.check(self.options.gpus, method=self.method)
        except FieldError as exc:
            errors.append(exc)
        if errors:
            raise rule_errors("JobRequest", errors)
        return self

    def public_dict(self) -> dict[str, Any]:
        """The request as stored and shown back: defaults filled in, secrets removed."""
        # `kind` lives in the row's column; leaving it out keeps quantization requests stored as before
        data = self.model_dump(mode="json", exclude={"hf_token", "kind"}, by_alias=False, exclude_none=False)
        if data.get("webhook"):
            data["webhook"].pop("secret", None)
        return data

    @property
    def source_label(self) -> str:
        return self.model.id if isinstance(self.model, HubModel) else self.model.path

    @property
    def method(self) -> str:
        return self.quantization_config["quant_method"]

    @property
    def bits(self) -> int | None:
        return quantization_rules.bits(self.quantization_config)
