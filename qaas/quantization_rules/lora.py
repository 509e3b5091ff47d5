"""A fine-tuning job's `lora`: the field names of peft's `LoraConfig` (the adapter trained on the 4-bit base).

Defaults are peft's, except `target_modules`, which defaults to "all-linear": the QLoRA recipe puts adapters
on every linear layer of the decoder blocks (peft's own default depends on the architecture and covers only
the attention projections of a Llama). Fields that have no meaning on a 4-bit base, or that peft derives
itself, are refused with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .fields import Boolean, Choice, FieldError, Integer, Kind, Names, Number, ObjectRules, Text

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class TargetModules(Kind):
    """"all-linear", a list of module names (suffixes, as peft matches them), or one regular expression that
    peft matches against the full module names."""

    default: Any = ALL_LINEAR

    def convert(self, value: Any, name: str) -> Any:
        if isinstance(value, str):
            if value == ALL_LINEAR:
                return value
            if not value or len(value) > 500:
                raise FieldError(name, "a regular expression must be 1 to 500 characters")
            try:
                re.compile(value)
            except re.error as exc:
                raise FieldError(name, f"is not a valid regular expression ({exc})") from None
            return value
        return Names(non_empty=True).convert(value, name)

    def value_schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string", "description": "'all-linear' or a regular expression"},
                          {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]}


@dataclass(frozen=True)
class IntMap(Kind):
    """{module name or pattern: positive integer} (peft's rank_pattern / alpha_pattern)."""

    def convert(self, value: Any, name: str) -> dict[str, int]:
        if not isinstance(value, dict):
            raise FieldError(name, "must be an object of module name -> integer")
        for k, v in value.items():
            if not k or len(k) > 200:
                raise FieldError(name, "keys must be module names (1 to 200 characters)")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FieldError(f"{name}.{k}", "must be a positive integer")
        return dict(value)

    def value_schema(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}}


@dataclass(frozen=True)
class Layers(Kind):
    """An integer or a list of non-negative integers (peft's layers_to_transform)."""

    def convert(self, value: Any, name: str) -> Any:
        items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(items, list) or not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                                            for i in items):
            raise FieldError(name, "must be a layer index or a non-empty list of layer indices")
        return value

    def value_schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "integer", "minimum": 0},
                          {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}]}


@dataclass(frozen=True)
class InitWeights(Kind):
    default: Any = True

    def convert(self, value: Any, name: str) -> Any:
        if isinstance(value, bool) or value == "gaussian":
            return value
        raise FieldError(name, "must be true, false or 'gaussian' (initialisations that read the unquantized "
                               "weights -- pissa, olora, loftq, eva -- need a base that is not 4-bit)")

    def value_schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["gaussian"]}]}


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    if c["layers_pattern"] is not None and c["layers_to_transform"] is None:
        raise FieldError("layers_pattern", "only means something together with layers_to_transform")
    if c["use_dora"] and c["fan_in_fan_out"]:
        raise FieldError("use_dora", "DoRA does not support fan_in_fan_out layers")
    return c


_NOT_HERE = "is set by the service"

RULES = ObjectRules(
    title="LoraConfig",
    fields={
        "r": Integer(8, minimum=1, maximum=1024, description="adapter rank"),
        "lora_alpha": Integer(8, minimum=1, maximum=100_000, description="scaling numerator (alpha / r, or "
                                                                          "alpha / sqrt(r) with use_rslora)"),
        "lora_dropout": Number(0.0, minimum=0.0, maximum=1.0, exclusive=False),
        "target_modules": TargetModules(description="'all-linear' (default: every linear layer of the blocks), "
                                                    "module names, or a regular expression"),
        "exclude_modules": Names(description="module names left without an adapter"),
        "bias": Choice("none", choices=("none", "all", "lora_only")),
        "use_rslora": Boolean(False, description="rank-stabilized scaling alpha / sqrt(r)"),
        "use_dora": Boolean(False),
        "modules_to_save": Names(description="modules trained in full and saved beside the adapter (e.g. lm_head)"),
        "init_lora_weights": InitWeights(),
        "layers_to_transform": Layers(),
        "layers_pattern": Text(max_length=200),
        "rank_pattern": IntMap(),
        "alpha_pattern": IntMap(),
        "fan_in_fan_out": Boolean(False),
        "task_type": Choice("CAUSAL_LM", choices=("CAUSAL_LM",), why="the service fine-tunes causal language models"),
    },
    refused={
        "peft_type": "the adapter is LoRA (peft_type LORA); other peft methods are not offered",
        "base_model_name_or_path": _NOT_HERE + " (the job's model)",
        "revision": _NOT_HERE + " (the model's revision is model.revision)",
        "inference_mode": _NOT_HERE + " (false while training, true in the saved adapter)",
        "loftq_config": "LoftQ initialisation reads the unquantized weights; the base here is 4-bit",
        "megatron_config": "Megatron parallelism is not offered",
        "megatron_core": "Megatron parallelism is not offered",
    },
    combine=_combine,
)


def normalize(value: Any) -> dict[str, Any]:
    return RULES.normalize(value, "lora")
