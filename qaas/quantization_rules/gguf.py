"""`quant_method: "gguf"`: GGUF files for llama.cpp, Ollama and LM Studio, one per quant type, from one conversion.

    {"quant_method": "gguf", "types": ["Q4_K_M", "Q8_0"], "imatrix": false, "dataset": null,
     "output_type_default": "F16", "split_max_size": null}

* `types`: quant type names exactly as llama.cpp's `llama-quantize` spells them (`F16`, `Q8_0`, `Q4_K_M`, ...);
  each becomes `model-<TYPE>.gguf`. A name llama.cpp knows but this service does not produce (yet) is refused
  with that reason, never approximated: a file called Q4_K_M must hold what llama.cpp's Q4_K_M holds.
* `imatrix`: compute llama.cpp's importance matrix (imatrix.cpp's: per weight of a block, the mean over the
  calibration tokens of each input column's square) from `dataset` on the job's device, block by block on the
  unquantized model, and quantize every k-quant, IQ4 and Q4_0/Q4_1/Q5_0/Q5_1 tensor with it, as
  `llama-quantize --imatrix` does (the recipes' imatrix rules included); the matrix is also written as
  `imatrix.gguf` in llama.cpp's format (`llama-quantize --imatrix imatrix.gguf` takes it). `nsamples` windows of
  `model_seqlen` tokens (default 128 x 512, llama-imatrix's context) drawn with `seed`.
* `output_type_default`: the floating-point type of the conversion, i.e. of the tensors no quant type touches
  (norms) in every file, and of the `model-<TYPE>.gguf` written for it when asked in `types`.
* `split_max_size`: at most this many bytes per file (`"48GB"`, `"500M"`, as `llama-gguf-split
  --split-max-size` takes it, 1000-based); larger outputs are split into `-0000i-of-0000N.gguf` parts.

Architectures: llama.cpp's LLAMA graph (`LlamaForCausalLM`: Llama 2/3, SmolLM, TinyStories;
`MistralForCausalLM`), its QWEN2 graph (`Qwen2ForCausalLM`: Qwen2, Qwen2.5) and its QWEN3 graph
(`Qwen3ForCausalLM`). The tokenizer is a SentencePiece tokenizer.model or a byte-level BPE tokenizer.json whose
pre-tokenizer llama.cpp implements (Llama 3's, Qwen2's, SmolLM's, GPT-2's); the engine refuses another naming
`model`. Other architectures are refused at submission where the model's config.json is at hand (a local
model), else when the engine reads it, naming `model`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .calibration import CalibrationSources, Dataset, check_source
from .fields import Boolean, Choice, FieldError, Integer, Kind, MethodRules

#: Floating-point types (no quantization).
FLOAT_TYPES = ("F32", "F16", "BF16")
#: Every type name llama-quantize accepts that the request may name (llama.cpp's spelling).
LLAMA_CPP_TYPES = FLOAT_TYPES + (
    "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
    "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
)
#: What the engine writes, byte-exact with llama.cpp's own quantizer (tests/kernels/test_gguf_quants.py).
#: A type leaves this list's complement only with its quantizer and its test.
SUPPORTED_TYPES = FLOAT_TYPES + ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                                 "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
#: A job may ask for every type produced, once each.
MAX_TYPES = len(SUPPORTED_TYPES)
#: Types whose quantizer needs an importance matrix (llama-quantize refuses them without one; IQ4_NL and IQ4_XS
#: take one when given, as the k-quants do).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")
#: The Hugging Face architectures converted: to llama.cpp's LLAMA graph (Llama, Mistral), QWEN2 (Qwen2 and
#: Qwen2.5, whose configs both say Qwen2ForCausalLM) and QWEN3.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: Calibration windows of the importance matrix when neither `nsamples` nor the job's options say.
DEFAULT_NSAMPLES = 128
#: Their length: llama-imatrix's default context.
DEFAULT_SEQLEN = 512

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
#: Below this a split would make thousands of parts of a small model (llama-gguf-split's smallest is 1M).
MIN_SPLIT_BYTES = 10**6


def split_bytes(value: str | None) -> int | None:
    """`split_max_size` in bytes ("48GB" -> 48e9), None for no split."""
    if value is None:
        return None
    m = _SIZE.match(value)
    assert m, value  # normalize() accepted it
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Types(Kind):
    """A non-empty list of distinct llama.cpp quant type names that the engine produces."""

    required: bool = True
    missing: str = "field required: a list of llama.cpp quant types, e.g. [\"Q4_K_M\", \"Q8_0\"]"
    description: str = "llama.cpp quant types, one output file each; produced: " + ", ".join(SUPPORTED_TYPES)

    def convert(self, value: Any, name: str) -> list[str]:
        if not isinstance(value, list) or not value:
            raise FieldError(name, "must be a non-empty list of llama.cpp quant types")
        if len(value) > MAX_TYPES:
            raise FieldError(name, f"may hold at most {MAX_TYPES} types")
        seen: list[str] = []
        for i, t in enumerate(value):
            if not isinstance(t, str):
                raise FieldError(f"{name}.{i}", "must be a string")
            if t not in LLAMA_CPP_TYPES:
                close = [k for k in LLAMA_CPP_TYPES if k.lower() == t.strip().lower()]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FieldError(f"{name}.{i}", f"unknown llama.cpp quant type {t[:40]!r}{hint}; produced here: "
                                                + ", ".join(SUPPORTED_TYPES))
            if t not in SUPPORTED_TYPES:
                raise FieldError(f"{name}.{i}", f"{t} is a llama.cpp type this service does not produce yet (its "
                                                "quantizer is not byte-exact with llama.cpp's); produced here: "
                                                + ", ".join(SUPPORTED_TYPES))
            if t in seen:
                raise FieldError(f"{name}.{i}", f"{t} is listed twice")
            seen.append(t)
        return seen

    def value_schema(self) -> dict[str, Any]:
        return {"type": "array", "minItems": 1, "maxItems": MAX_TYPES, "uniqueItems": True,
                "items": {"type": "string", "enum": list(SUPPORTED_TYPES)}}


@dataclass(frozen=True)
class SplitSize(Kind):
    def convert(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or not _SIZE.match(value):
            raise FieldError(name, "must be a size such as \"48GB\" or \"500M\" (K, M, G, T: powers of 1000), or null")
        m = _SIZE.match(value)
        if int(float(m.group(1)) * _UNITS[m.group(2).upper()]) < MIN_SPLIT_BYTES:
            raise FieldError(name, "must be at least 1M")
        return value.strip()

    def value_schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": _SIZE.pattern}


@dataclass(frozen=True)
class OptionalDataset(Dataset):
    """`dataset`, which only the importance matrix reads: null when there is none."""

    required: bool = False

    def schema(self) -> dict[str, Any]:
        s = super().schema()
        return {"anyOf": [*s["anyOf"], {"type": "null"}], "description": s["description"]}


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    if c["imatrix"] and c["dataset"] is None:
        raise FieldError("dataset", "imatrix: true computes the importance matrix from calibration data: give a "
                                    "list of texts, a registered dataset name or a local .txt/.jsonl path")
    if not c["imatrix"]:
        if c["dataset"] is not None:
            raise FieldError("dataset", "only the importance matrix reads calibration data; set imatrix: true "
                                        "or leave dataset out")
        for i, t in enumerate(c["types"]):
            if t in NEEDS_IMATRIX:
                raise FieldError(f"types.{i}", f"{t} needs an importance matrix: set imatrix: true and a dataset")
    return c


RULES = MethodRules(
    quant_method="gguf",
    title="GGUF",
    fields={
        "types": Types(),
        "imatrix": Boolean(False, description="compute llama.cpp's importance matrix from dataset and quantize with it"),
        "dataset": OptionalDataset(),
        "nsamples": Integer(minimum=1, maximum=4096,
                            description="importance-matrix calibration windows; default: the job's "
                                        f"options.calibration_samples, else {DEFAULT_NSAMPLES}"),
        "model_seqlen": Integer(DEFAULT_SEQLEN, minimum=8, maximum=131072,
                                description="importance-matrix window length (llama-imatrix's context)"),
        "seed": Integer(0, minimum=0, maximum=2**32 - 1, description="seed of the calibration windows' draw"),
        "output_type_default": Choice("F16", choices=FLOAT_TYPES,
                                      description="floating-point type of the conversion (and of unquantized tensors)"),
        "split_max_size": SplitSize(description="split each file into parts of at most this size (\"48GB\")"),
    },
    refused={
        "bits": "GGUF takes llama.cpp quant types (types), not bits",
        "load_in_4bit": "is a bitsandbytes option; GGUF takes types",
        "group_size": "GGUF block sizes are fixed by each quant type",
    },
    combine=_combine,
)


def check_sources(config: dict[str, Any], sources: CalibrationSources) -> None:
    if config["dataset"] is not None:
        check_source(config["dataset"], sources)


def check_model(config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """FieldError naming `model` unless the model's config.json describes an architecture converted here."""
    archs = model_config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise FieldError("model", f"GGUF conversion supports {', '.join(ARCHITECTURES)} (llama.cpp's LLAMA, QWEN2 "
                                  f"and QWEN3 graphs); this model is {arch or 'of no declared architecture'}")


def bits(config: dict[str, Any]) -> int | None:
    """The fewest nominal bits per weight of the types asked (the job row's `bits`: 4 for Q4_K_M, 16 for F16)."""
    found = [int(m.group(1)) for t in config["types"] if (m := re.match(r"^(?:BF|I?Q|TQ|F)(\d+)", t))]
    return min(found) if found else None
