"""`quant_method: "bitsandbytes"`: transformers' `BitsAndBytesConfig` fields (its `.to_dict()` is a valid config)."""

from __future__ import annotations

from typing import Any

from .fields import Boolean, Choice, FieldError, MethodRules, Names, Number

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    four, eight = c["load_in_4bit"], c["load_in_8bit"]
    if four and eight:
        raise FieldError("load_in_4bit", "load_in_4bit and load_in_8bit are exclusive; set exactly one")
    if not (four or eight):
        raise FieldError("load_in_4bit", "set load_in_4bit or load_in_8bit to true")
    if eight and c["llm_int8_has_fp16_weight"]:
        raise FieldError("llm_int8_has_fp16_weight",
                         "true keeps 8-bit layers in float16 for training; an ahead-of-time 8-bit export stores "
                         "int8 weights, so it must be false")
    return c


RULES = MethodRules(
    quant_method="bitsandbytes",
    title="bitsandbytes",
    fields={
        "load_in_4bit": Boolean(False),
        "load_in_8bit": Boolean(False),
        "llm_int8_threshold": Number(6.0, minimum=0),
        "llm_int8_skip_modules": Names(description="modules kept in floating point; default: transformers' "
                                                   "choice (the output head and tied modules)"),
        "llm_int8_enable_fp32_cpu_offload": Boolean(False),
        "llm_int8_has_fp16_weight": Boolean(False),
        "bnb_4bit_compute_dtype": Choice("float32", choices=COMPUTE_DTYPES),
        "bnb_4bit_quant_type": Choice("fp4", choices=("nf4", "fp4")),
        "bnb_4bit_use_double_quant": Boolean(False),
        "bnb_4bit_quant_storage": Choice("uint8", choices=("uint8",), why=(
            "other storage dtypes exist for FSDP training; the service stores packed 4-bit weights as uint8")),
    },
    # BitsAndBytesConfig.to_dict() writes these private twins too.
    aliases={"_load_in_4bit": "load_in_4bit", "_load_in_8bit": "load_in_8bit"},
    refused={
        "bits": "bitsandbytes takes load_in_4bit or load_in_8bit, not bits",
        "dataset": "bitsandbytes quantization takes no calibration data",
    },
    combine=_combine,
)


def bits(config: dict[str, Any]) -> int:
    return 4 if config["load_in_4bit"] else 8
