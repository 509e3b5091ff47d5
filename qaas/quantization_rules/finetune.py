"""The rules of a fine-tuning job (`"kind": "finetune"`) other than `lora` and `training`: the 4-bit base's
`quantization_config`, the training data and what is not offered.

  * `quantization_config`: a `BitsAndBytesConfig` dict with `load_in_4bit` (QLoRA trains on a 4-bit base).
    Absent, it is NF4 with double quantization and compute dtype "auto" (bfloat16 where the GPU has it,
    float32 elsewhere; the result says which).
  * `dataset` / `eval_dataset` (`TrainingData`): a list of texts; a list of chat conversations (each a list of
    {"role", "content"}, rendered with the model's own chat template); the absolute path of a local .jsonl
    (rows {"text": ...} or {"messages": [...]}) or .txt (examples separated by blank lines) under the allowed
    roots; or a Hub dataset id (its "train" split, a "text" or "messages" column), which must be fetchable
    where it runs or registered as a local copy (`check_source`, asked at submission and in the engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import bitsandbytes
from .calibration import CalibrationSources, check_source, dataset_kind, local_file
from .fields import FieldError, InvalidQuantizationConfig, Kind
from .hub_ids import repo_id_problem

DEFAULT_BASE = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "auto"}
COMPUTE_AUTO = "auto"
ROLES = ("system", "user", "assistant", "tool")
MAX_EXAMPLES = 100_000
MAX_CHARS = 64 * 1024 * 1024
MAX_NAME_LENGTH = 1024
TRAINING_SUFFIXES = (".jsonl", ".txt")


def normalize_base(value: Any) -> dict[str, Any]:
    """The base's quantization_config: BitsAndBytesConfig rules, 4-bit only; errors name quantization_config.*"""
    if value is None:
        return dict(DEFAULT_BASE)
    if not isinstance(value, dict):
        raise InvalidQuantizationConfig([FieldError("quant_method", "quantization_config must be an object")])
    given = dict(value)
    qm = given.get("quant_method", "bitsandbytes")
    if qm != "bitsandbytes":
        raise InvalidQuantizationConfig([FieldError("quant_method", (
            "a fine-tuning job loads its base in 4-bit with bitsandbytes (a BitsAndBytesConfig); to train on a "
            "GPTQ model's output, fine-tune the original model"))])
    auto = given.get("bnb_4bit_compute_dtype") == COMPUTE_AUTO
    if auto:
        given.pop("bnb_4bit_compute_dtype")
    out = bitsandbytes.RULES.normalize({**given, "quant_method": "bitsandbytes"})
    if not out["load_in_4bit"]:
        raise InvalidQuantizationConfig([FieldError("load_in_8bit", (
            "fine-tuning trains LoRA adapters on a 4-bit base (QLoRA): set load_in_4bit"))])
    if auto:
        out["bnb_4bit_compute_dtype"] = COMPUTE_AUTO
    return out


@dataclass(frozen=True)
class TrainingData(Kind):
    """`dataset` / `eval_dataset` (see the module docstring)."""

    missing: str = ("needs training data: a list of texts, a list of chat conversations, the path of a local "
                    ".jsonl/.txt file, or a Hub dataset id (owner/name)")

    def convert(self, value: Any, name: str) -> Any:
        if isinstance(value, list):
            return self._examples(value, name)
        if not isinstance(value, str):
            raise FieldError(name, "must be a list of texts or conversations, a file path or a Hub dataset id")
        if not value.strip() or len(value) > MAX_NAME_LENGTH or any(ord(c) < 32 for c in value):
            raise FieldError(name, f"must be a file path or a Hub dataset id (at most {MAX_NAME_LENGTH} "
                                   "characters, no control characters)")
        if dataset_kind(value) == "file":
            if not value.startswith("/"):
                raise FieldError(name, "a training file must be an absolute path")
            if not value.lower().endswith(TRAINING_SUFFIXES):
                raise FieldError(name, "a training file must be .jsonl (text or messages rows) or .txt")
            return value
        problem = repo_id_problem(value) if "/" in value else "must be owner/name"
        if problem:
            raise FieldError(name, f"a Hub dataset id {problem}")
        return value

    @staticmethod
    def _examples(value: list, name: str) -> list:
        if not value:
            raise FieldError(name, "must not be an empty list")
        if len(value) > MAX_EXAMPLES:
            raise FieldError(name, f"may hold at most {MAX_EXAMPLES} examples")
        texts = isinstance(value[0], str)
        total = 0
        for i, ex in enumerate(value):
            if texts:
                if not isinstance(ex, str):
                    raise FieldError(f"{name}.{i}", "must be a string (the list holds texts)")
                total += len(ex)
                continue
            if not isinstance(ex, list) or not ex:
                raise FieldError(f"{name}.{i}", "must be a conversation: a non-empty list of {role, content}")
            for j, m in enumerate(ex):
                where = f"{name}.{i}.{j}"
                if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
                    raise FieldError(where, "must be {\"role\": ..., \"content\": ...}")
                if m["role"] not in ROLES:
                    raise FieldError(f"{where}.role", f"must be one of {', '.join(ROLES)}")
                if not isinstance(m["content"], str):
                    raise FieldError(f"{where}.content", "must be a string")
                total += len(m["content"])
        if total > MAX_CHARS:
            raise FieldError(name, f"the examples may hold at most {MAX_CHARS} characters in all")
        if texts and not any(t.strip() for t in value):
            raise FieldError(name, "the texts are all empty")
        return list(value)

    def value_schema(self) -> dict[str, Any]:
        message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
                   "properties": {"role": {"type": "string", "enum": list(ROLES)}, "content": {"type": "string"}}}
        return {"anyOf": [
            {"type": "array", "minItems": 1, "items": {"type": "string"}, "description": "texts"},
            {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": message},
             "description": "chat conversations, rendered with the model's chat template"},
            {"type": "string", "description": "an absolute .jsonl/.txt path under the allowed roots, or a Hub "
                                              "dataset id (owner/name)"},
        ]}


def data_kind(value: Any) -> str:
    """"texts", "chat", "file" or "hub", for a value TrainingData accepted."""
    if isinstance(value, list):
        return "texts" if isinstance(value[0], str) else "chat"
    return "file" if dataset_kind(value) == "file" else "hub"


def check_data_source(value: Any, sources: CalibrationSources, name: str) -> None:
    """FieldError unless the (valid) training data can be read here: a file under the roots, a registered
    copy of a Hub dataset, or a hub the `datasets` library can reach."""
    kind = data_kind(value)
    if kind == "file":
        local_file(value, sources.roots, name)
    elif kind == "hub":
        check_source(value, sources, name)


#: What `merge.quantization_config` may re-quantize the merged model with: the methods whose pipelines
#: take a float checkpoint and whose outputs the tests load in their consumers.
MERGE_METHODS = ("gptq", "bitsandbytes")


def check_merge_method(config: dict[str, Any]) -> None:
    """InvalidQuantizationConfig (naming `quantization_config.quant_method`) unless the normalized config
    re-quantizes with one of MERGE_METHODS."""
    if config["quant_method"] not in MERGE_METHODS:
        raise InvalidQuantizationConfig([FieldError("quantization_config.quant_method", (
            f"the merged model is re-quantized with {' or '.join(MERGE_METHODS)}, not {config['quant_method']}"))])


def check_merge_adapter(lora: dict[str, Any]) -> None:
    """InvalidQuantizationConfig unless the normalized `lora` is an adapter the merge folds into the base
    weights: plain LoRA deltas (DoRA's magnitude vectors rescale whole columns, merged differently)."""
    if lora.get("use_dora"):
        raise InvalidQuantizationConfig([FieldError("merge", (
            "merging a DoRA adapter (lora.use_dora) is not offered: train plain LoRA to get a merged output"))])
