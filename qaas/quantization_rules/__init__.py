"""The one set of rules a `quantization_config` must follow, for the API and the engine alike.

Plain Python (no pydantic, no torch): the request schema (`qaas.schemas.job_request`) calls it for every
submission and writes its OpenAPI description from it (`json_schema`), and the engine's methods call it
before they touch a model, so the two cannot drift. Every refusal names the field.

  * `normalize(config)`: each field checked and defaults filled in (the dict stored with the job and given
    to the engine); `InvalidQuantizationConfig` lists every broken rule;
  * `check_model(config, model_config)`: whether the method takes that model (its config.json), where known;
    asked wherever config.json can be read before the job runs (a local model at submission, the engine);
  * `check_sources(config, sources)`: what depends on the place it runs, i.e. whether the calibration
    data can be had there (`CalibrationSources`: allowed roots, registered local copies, a usable hub).

Adding a method: write `<quant_method>.py` here with its `RULES = MethodRules(...)` (see `fields.py`; the
field names of the library config it mirrors, e.g. AWQ's `AwqConfig`, a compressed-tensors scheme, GGUF
types, a `LoraConfig` + `TrainingArguments` request), `bits(config)` and, if it reads calibration data or
files, a `check_sources(config, sources)` (calibration data: `calibration.Dataset` and
`calibration.check_source`); then add its line to `METHODS` below.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import awq, bitsandbytes, compressed_tensors, gguf, gptq
from .calibration import CalibrationSources
from .fields import FieldError, InvalidQuantizationConfig

#: quant_method -> the module holding its RULES (and its check_sources, if any).
METHODS: dict[str, ModuleType] = {
    "awq": awq,
    "bitsandbytes": bitsandbytes,
    "compressed-tensors": compressed_tensors,
    "gguf": gguf,
    "gptq": gptq,
}

__all__ = ["METHODS", "CalibrationSources", "FieldError", "InvalidQuantizationConfig", "check_model", "check_sources",
           "bits", "json_schema", "normalize"]


def _method(config: Any) -> ModuleType:
    if not isinstance(config, dict):
        raise InvalidQuantizationConfig([FieldError("quant_method", "quantization_config must be an object")])
    qm = config.get("quant_method")
    module = METHODS.get(qm) if isinstance(qm, str) else None
    if module is None:
        shown = repr(qm)[:60] if qm is not None else "missing"
        raise InvalidQuantizationConfig([FieldError(
            "quant_method", f"must be one of {', '.join(sorted(METHODS))} ({shown})")])
    return module


def normalize(config: Any) -> dict[str, Any]:
    """The config checked field by field, defaults filled in; InvalidQuantizationConfig otherwise."""
    return _method(config).RULES.normalize(config)


def check_sources(config: dict[str, Any], sources: CalibrationSources) -> None:
    """For a normalized config: InvalidQuantizationConfig unless what it reads can be had with `sources`."""
    check = getattr(_method(config), "check_sources", None)
    if check is not None:
        try:
            check(config, sources)
        except FieldError as exc:
            raise InvalidQuantizationConfig([exc]) from None


def check_model(config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """For a normalized config: InvalidQuantizationConfig (naming `model`) unless the method can take a model
    with this config.json (GGUF converts only the architectures llama.cpp's graphs it maps; AWQ needs a scaling
    map for the model_type)."""
    check = getattr(_method(config), "check_model", None)
    if check is not None:
        try:
            check(config, model_config)
        except FieldError as exc:
            raise InvalidQuantizationConfig([exc]) from None


def bits(config: dict[str, Any]) -> int | None:
    """The weight bit width of a normalized config (the job row's `bits`), None for a method without one."""
    return _method(config).bits(config)


def json_schema() -> dict[str, Any]:
    """JSON Schema of quantization_config: one object schema per method, chosen by quant_method."""
    return {
        "oneOf": [m.RULES.json_schema() for m in METHODS.values()],
        "description": "The fields of transformers' config for the method (GPTQConfig, BitsAndBytesConfig, AwqConfig); "
                       "a config's .to_dict() is a valid value.",
    }
