"""The job request: what to quantize, how, and where the result goes.

`quantization_config` is the dict transformers writes: the field names and defaults of
`GPTQConfig` (`quant_method: "gptq"`) and `BitsAndBytesConfig` (`quant_method: "bitsandbytes"`),
so a user's existing config (including the output of `.to_dict()`) is a valid request. Everything
is validated up front: an impossible combination is a 422 naming the field, never a job that fails
an hour later.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from qaas.schemas.base import RequestModel

# Hub repo ids: "name" or "owner/name", the characters the Hub allows, no "..", no leading "-" or ".".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# Branch/tag names or commit shas; no "..", no leading "-", no control characters or spaces.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,199}$")
MAX_CALIBRATION_TEXTS = 4096
MAX_CALIBRATION_CHARS = 4 * 1024 * 1024


class _Strict(RequestModel):
    pass


def _check_repo_id(value: str, what: str) -> str:
    if not _REPO_ID.match(value) or ".." in value or value.endswith((".", "-")) or value.endswith(".git"):
        raise ValueError(f"{what} must look like 'owner/name' (letters, digits, '-', '_', '.')")
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

Dataset = str | list[str]


class GPTQQuantizationConfig(_Strict):
    """transformers' GPTQConfig, field for field (defaults included)."""

    quant_method: Literal["gptq"]
    bits: Literal[2, 3, 4, 8]
    group_size: int = 128
    damp_percent: float = Field(default=0.1, gt=0, lt=1)
    desc_act: bool = False
    act_group_aware: bool = True
    sym: bool = True
    true_sequential: bool = True
    static_groups: bool = False
    format: Literal["gptq", "gptq_v2"] = "gptq"
    checkpoint_format: Literal["gptq", "gptq_v2"] | None = None
    dataset: Dataset | None = None
    model_seqlen: int | None = Field(default=None, ge=8, le=131072)
    batch_size: int = Field(default=1, ge=1, le=1024)
    modules_in_block_to_quantize: list[list[str]] | None = None
    block_name_to_quantize: str | None = Field(default=None, max_length=200)
    module_name_preceding_first_block: list[str] | None = None
    cache_block_outputs: bool = True
    # Inference-time or tokenizer fields of GPTQConfig.to_dict(): accepted so that an existing
    # config is a valid request, recorded, and without effect on the stored model.
    tokenizer: str | None = None
    backend: str | None = None
    use_exllama: bool | None = None
    exllama_config: dict[str, Any] | None = None
    use_cuda_fp16: bool | None = None
    max_input_length: int | None = None
    pad_token_id: int | None = None
    meta: dict[str, Any] | None = None
    lm_head: bool = False

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v == -1 or v > 0:
            if v > 65536:
                raise ValueError("group_size must be -1 or at most 65536")
            return v
        raise ValueError("group_size must be -1 (one group per row) or a positive integer")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: Dataset | None) -> Dataset | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("dataset must not be an empty list")
            if len(v) > MAX_CALIBRATION_TEXTS:
                raise ValueError(f"dataset may hold at most {MAX_CALIBRATION_TEXTS} texts")
            if sum(len(t) for t in v) > MAX_CALIBRATION_CHARS:
                raise ValueError(f"dataset texts may hold at most {MAX_CALIBRATION_CHARS} characters in all")
            if not any(t.strip() for t in v):
                raise ValueError("dataset texts are all empty")
        elif isinstance(v, str):
            if not v.strip() or len(v) > 1024:
                raise ValueError("dataset must be a dataset name, a file path or a list of texts")
        return v

    @field_validator("modules_in_block_to_quantize")
    @classmethod
    def _modules(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        if v is not None and (not v or any(not group for group in v)):
            raise ValueError("modules_in_block_to_quantize must be a non-empty list of non-empty lists")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "GPTQQuantizationConfig":
        if self.dataset is None:
            raise ValueError(
                "dataset: GPTQ needs calibration data: a name ('wikitext2', 'c4'), a Hub dataset id, "
                "a file path, or a list of texts"
            )
        if self.checkpoint_format is not None and self.checkpoint_format != self.format:
            raise ValueError("checkpoint_format: must equal format when both are given")
        if self.lm_head:
            raise ValueError("lm_head: quantizing the output head is not supported; leave it false")
        return self


class BitsAndBytesQuantizationConfig(_Strict):
    """transformers' BitsAndBytesConfig, field for field (defaults included)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    quant_method: Literal["bitsandbytes"]
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    # BitsAndBytesConfig.to_dict() writes these private twins too; accept and reconcile them.
    load_in_4bit_private: bool | None = Field(default=None, alias="_load_in_4bit")
    load_in_8bit_private: bool | None = Field(default=None, alias="_load_in_8bit")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    bnb_4bit_quant_storage: str | None = None
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_threshold: float = Field(default=6.0, ge=0)
    llm_int8_has_fp16_weight: bool = False
    llm_int8_enable_fp32_cpu_offload: bool = False

    @model_validator(mode="before")
    @classmethod
    def _reject_foreign_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "dataset" in data:
                raise ValueError("dataset: bitsandbytes quantization takes no calibration data")
            if "bits" in data:
                raise ValueError("bits: bitsandbytes takes load_in_4bit or load_in_8bit, not bits")
        return data

    @field_validator("bnb_4bit_quant_storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v not in (None, "uint8"):
            raise ValueError(
                f"bnb_4bit_quant_storage {v!r} is not supported: the service stores packed 4-bit weights as uint8"
            )
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> "BitsAndBytesQuantizationConfig":
        four = self.load_in_4bit or bool(self.load_in_4bit_private)
        eight = self.load_in_8bit or bool(self.load_in_8bit_private)
        if four and eight:
            raise ValueError("load_in_4bit: load_in_4bit and load_in_8bit are exclusive; set exactly one")
        if not four and not eight:
            raise ValueError("load_in_4bit: set load_in_4bit or load_in_8bit to true")
        if self.llm_int8_has_fp16_weight:
            raise ValueError(
                "llm_int8_has_fp16_weight: a model that keeps fp16 weights is not quantized; leave it false"
            )
        self.load_in_4bit, self.load_in_8bit = four, eight
        self.load_in_4bit_private = self.load_in_8bit_private = None
        return self

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8


QuantizationConfig = Annotated[
    GPTQQuantizationConfig | BitsAndBytesQuantizationConfig, Field(discriminator="quant_method")
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
    calibration_samples: int = Field(default=128, ge=1, le=4096, description="GPTQ calibration sequences")
    priority: int = Field(default=0, ge=0, le=9, description="higher runs first")
    time_limit_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)


class JobRequest(_Strict):
    model: HubModel | LocalModel
    quantization_config: QuantizationConfig
    options: JobOptions = Field(default_factory=JobOptions)
    push_to_hub: PushToHub | None = None
    webhook: WebhookTarget | None = None
    hf_token: SecretStr | None = Field(default=None, description="write-only; never returned or logged")

    @field_validator("hf_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            raw = v.get_secret_value()
            if not raw or len(raw) > 512 or any(c.isspace() for c in raw):
                raise ValueError("hf_token is not a valid token")
        return v

    def public_dict(self) -> dict[str, Any]:
        """The request as stored and shown back: defaults filled in, secrets removed."""
        data = self.model_dump(mode="json", exclude={"hf_token"}, by_alias=False, exclude_none=False)
        qc = data["quantization_config"]
        qc.pop("load_in_4bit_private", None)
        qc.pop("load_in_8bit_private", None)
        if data.get("webhook"):
            data["webhook"].pop("secret", None)
        return data

    @property
    def source_label(self) -> str:
        return self.model.id if isinstance(self.model, HubModel) else self.model.path

    @property
    def method(self) -> str:
        return self.quantization_config.quant_method

    @property
    def bits(self) -> int:
        return self.quantization_config.bits
