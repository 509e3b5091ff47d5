"""The request of a fine-tuning job (`"kind": "finetune"`): QLoRA adapters trained on a 4-bit base.

`lora` holds peft `LoraConfig` field names, `training` transformers `TrainingArguments` names (plus
`max_seq_length` and `packing`), `quantization_config` the base's `BitsAndBytesConfig`; their rules are
`qaas.quantization_rules.lora` / `training` / `finetune`, plain Python shared with the engine. `model` may also
be `{"job": "<id>"}`: the output of one of the caller's own succeeded jobs (checked at submission), so
"quantize, then fine-tune" is two calls.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from qaas.quantization_rules import InvalidQuantizationConfig, gpus
from qaas.quantization_rules.fields import FieldError
from qaas.quantization_rules import finetune as finetune_rules
from qaas.quantization_rules import lora as lora_rules
from qaas.quantization_rules import training as training_rules
from qaas.schemas.base import RequestModel
from qaas.schemas.job_request import (
    HubModel,
    HubToken,
    JobOptions,
    LocalModel,
    PushToHub,
    QuantizationConfig,
    WebhookTarget,
    rule_errors,
)


class JobOutput(RequestModel):
    """The output of one of the caller's own succeeded jobs (a bitsandbytes 4-bit model, or any model that
    was not quantized with GPTQ)."""

    job: uuid.UUID


class MergeSpec(RequestModel):
    """`merge`: the adapter merged into the de-quantized base and re-quantized, a second output of the job
    (folder `merged/`). `quantization_config` follows the rules of a quantization job's (GPTQ or
    bitsandbytes)."""

    quantization_config: QuantizationConfig

    @model_validator(mode="after")
    def _method(self) -> "MergeSpec":
        try:
            finetune_rules.check_merge_method(self.quantization_config)
        except InvalidQuantizationConfig as exc:
            raise _rule_errors("merge", "", exc, self.quantization_config) from None
        return self


def _rule_errors(title: str, root: str, exc: InvalidQuantizationConfig, given: Any) -> ValidationError:
    """Each broken rule as an error at its own field (`lora.r`, `training.optim`)."""
    details = []
    for e in exc.errors:
        parts = tuple(e.field.split("."))
        loc = parts[1:] if parts and parts[0] == root else parts
        details.append(InitErrorDetails(type=PydanticCustomError("finetune_rule", "{message}", {"message": e.message}),
                                        loc=loc, input=given))
    return ValidationError.from_exception_data(title, details)


def _lora(value: Any) -> dict[str, Any]:
    try:
        return lora_rules.normalize(value)
    except InvalidQuantizationConfig as exc:
        raise _rule_errors("lora", "lora", exc, value) from None


def _training(value: Any) -> dict[str, Any]:
    try:
        return training_rules.normalize(value)
    except InvalidQuantizationConfig as exc:
        raise _rule_errors("training", "training", exc, value) from None


def _base(value: Any) -> dict[str, Any]:
    try:
        return finetune_rules.normalize_base(value)
    except InvalidQuantizationConfig as exc:
        raise _rule_errors("quantization_config", "", exc, value) from None


def _data(value: Any, name: str) -> Any:
    from qaas.quantization_rules.fields import FieldError

    try:
        return finetune_rules.TrainingData(required=True).check(value, name)
    except FieldError as exc:
        raise _rule_errors(name, name, InvalidQuantizationConfig([exc]), value) from None


LoraSpec = Annotated[dict[str, Any], BeforeValidator(_lora), WithJsonSchema(lora_rules.RULES.json_schema())]
TrainingSpec = Annotated[dict[str, Any], BeforeValidator(_training), WithJsonSchema(training_rules.RULES.json_schema())]
BaseQuantization = Annotated[dict[str, Any], BeforeValidator(_base), WithJsonSchema({
    "type": "object", "description": "a BitsAndBytesConfig dict with load_in_4bit (default: NF4, double "
                                     "quantization, compute dtype 'auto')"})]
_DATA_SCHEMA = WithJsonSchema(finetune_rules.TrainingData().value_schema())
Dataset = Annotated[Any, BeforeValidator(lambda v: _data(v, "dataset")), _DATA_SCHEMA]
EvalDataset = Annotated[Any, BeforeValidator(lambda v: None if v is None else _data(v, "eval_dataset")), _DATA_SCHEMA]


def _model_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = set(value) & {"id", "path", "job"}
        if len(keys) == 1:
            return {"id": "HubModel", "path": "LocalModel", "job": "JobOutput"}[keys.pop()]
    elif isinstance(value, (HubModel, LocalModel, JobOutput)):
        return type(value).__name__
    return None


BaseModelSource = Annotated[
    Annotated[HubModel, Tag("HubModel")] | Annotated[LocalModel, Tag("LocalModel")]
    | Annotated[JobOutput, Tag("JobOutput")],
    Discriminator(_model_kind, custom_error_type="model_kind",
                  custom_error_message="give exactly one of id (a Hub model), path (a local directory) or job (the "
                                       "output of one of your succeeded jobs)"),
]


class FinetuneRequest(RequestModel):
    kind: Literal["finetune"]
    model: BaseModelSource
    #: None: NF4 + double quantization (or, for a {"job"} base already quantized, its own config).
    quantization_config: BaseQuantization | None = None
    lora: LoraSpec = Field(default_factory=lambda: lora_rules.normalize({}))
    training: TrainingSpec = Field(default_factory=lambda: training_rules.normalize({}))
    dataset: Dataset
    eval_dataset: EvalDataset = None
    merge: MergeSpec | None = Field(default=None, description="the adapter merged into the de-quantized base "
                                                              "and re-quantized: a second output, merged/")
    options: JobOptions = Field(default_factory=JobOptions)
    push_to_hub: PushToHub | None = None
    webhook: WebhookTarget | None = None
    hf_token: HubToken = None

    @model_validator(mode="after")
    def _merge_fits_the_adapter(self) -> "FinetuneRequest":
        if self.merge is not None:
            try:
                finetune_rules.check_merge_adapter(self.lora)
            except InvalidQuantizationConfig as exc:
                raise _rule_errors("FinetuneRequest", "", exc, self.lora) from None
        return self

    @model_validator(mode="after")
    def _on_one_gpu(self) -> "FinetuneRequest":
        try:
            gpus.check(self.options.gpus, method=self.method)
        except FieldError as exc:
            raise rule_errors("FinetuneRequest", [exc]) from None
        return self

    def public_dict(self) -> dict[str, Any]:
        """The request as stored and shown back: defaults filled in, secrets removed."""
        data = self.model_dump(mode="json", exclude={"hf_token"}, exclude_none=False)
        if data.get("webhook"):
            data["webhook"].pop("secret", None)
        return data

    @property
    def source_label(self) -> str:
        m = self.model
        return m.id if isinstance(m, HubModel) else m.path if isinstance(m, LocalModel) else f"job:{m.job}"

    @property
    def method(self) -> str:
        return "qlora"

    @property
    def bits(self) -> int | None:
        return 4

    @property
    def base_job(self) -> uuid.UUID | None:
        return self.model.job if isinstance(self.model, JobOutput) else None
