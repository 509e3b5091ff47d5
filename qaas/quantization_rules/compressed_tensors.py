"""`quant_method: "compressed-tensors"`: llm-compressor's preset schemes, written in the format vLLM and SGLang
load natively (what `oneshot(model, recipe=QuantizationModifier(scheme=..., targets="Linear", ignore=[...]))`
or `GPTQModifier(...)` saves).

Fields, by the names llm-compressor's modifiers and compressed-tensors' presets use:
  * `scheme`: FP8_DYNAMIC (e4m3 weights, per-channel scales; activations per token at run time), FP8 (per-tensor
    weight scale, a static per-tensor input scale calibrated on `dataset`), FP8_BLOCK (128x128 weight blocks,
    activations per 128-wide token group at run time), W8A8 (int8 per-channel weights, int8 per-token dynamic
    activations), W4A16 / W8A16 (int weights in groups of `group_size`, 16-bit activations: pack-quantized);
  * `ignore`: Linear layers left unquantized (module names, or `re:<regex>` as compressed-tensors matches them);
    default ["lm_head"];
  * `weights`: "rtn" (round to nearest, llm-compressor's QuantizationModifier) or "gptq" (GPTQModifier; integer
    schemes only), `dampening_frac` its damping;
  * `smoothing_strength`: SmoothQuant's alpha (SmoothQuantModifier), W8A8 only;
  * `group_size`: W4A16 / W8A16 only (the preset's 128 by default);
  * `dataset`, `nsamples`, `model_seqlen`, `seed`: the calibration data, needed by FP8 (static input scales),
    GPTQ and SmoothQuant, refused where nothing would read it.
"""

from __future__ import annotations

import re
from typing import Any

from .calibration import CalibrationSources, Dataset, check_source
from .fields import Choice, FieldError, Integer, MethodRules, Names, Number

#: scheme -> weight bits
SCHEMES: dict[str, int] = {"FP8_DYNAMIC": 8, "FP8": 8, "FP8_BLOCK": 8, "W8A8": 8, "W4A16": 4, "W8A16": 8}
#: schemes whose weights are integers (GPTQ applies to them)
INT_SCHEMES = ("W8A8", "W4A16", "W8A16")
GROUPED_SCHEMES = ("W4A16", "W8A16")
DEFAULT_GROUP_SIZE = 128
DEFAULT_IGNORE = ("lm_head",)
#: Calibration windows when neither `nsamples` nor the job's options.calibration_samples says.
DEFAULT_NSAMPLES = 128


class OptionalDataset(Dataset):
    """`dataset` where only some schemes read it: absent or null is allowed (the combination decides)."""

    def schema(self) -> dict[str, Any]:
        s = super().schema()
        return {"anyOf": [*s.pop("anyOf"), {"type": "null"}], **s}


def needs_calibration(c: dict[str, Any]) -> bool:
    """Whether a normalized config reads calibration data: static FP8 input scales, GPTQ, SmoothQuant."""
    return c["scheme"] == "FP8" or c["weights"] == "gptq" or c["smoothing_strength"] is not None


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    scheme = c["scheme"]
    if c["weights"] == "gptq" and scheme not in INT_SCHEMES:
        raise FieldError("weights", f"gptq applies to the integer schemes ({', '.join(INT_SCHEMES)}); "
                                    f"{scheme} weights are rounded to the nearest e4m3 value (rtn)")
    if c["weights"] != "gptq" and c["dampening_frac"] is not None:
        raise FieldError("dampening_frac", "is GPTQ's damping; set weights to gptq or leave it out")
    if c["weights"] == "gptq" and c["dampening_frac"] is None:
        c["dampening_frac"] = 0.01  # GPTQModifier's default
    if c["smoothing_strength"] is not None and scheme != "W8A8":
        raise FieldError("smoothing_strength", "SmoothQuant smooths activations for int8 activation quantization: "
                                               "W8A8 only")
    if scheme in GROUPED_SCHEMES:
        c["group_size"] = c["group_size"] or DEFAULT_GROUP_SIZE
    elif c["group_size"] is not None:
        raise FieldError("group_size", f"applies to {' and '.join(GROUPED_SCHEMES)}; {scheme} has its own fixed "
                                       "granularity")
    if c["ignore"] is None:
        c["ignore"] = list(DEFAULT_IGNORE)
    for i, name in enumerate(c["ignore"]):
        if name.startswith("re:"):
            try:
                re.compile(name[3:])
            except re.error as exc:
                raise FieldError(f"ignore.{i}", f"is not a valid regular expression ({exc})") from None
    if needs_calibration(c):
        if c["dataset"] is None:
            why = ("FP8 calibrates static input scales" if scheme == "FP8" else
                   "GPTQ needs calibration inputs" if c["weights"] == "gptq" else "SmoothQuant needs activation ranges")
            raise FieldError("dataset", f"needs calibration data ({why}): a list of texts, a dataset name or the "
                                        "path of a local .txt/.jsonl file")
    else:
        for name in ("dataset", "nsamples", "model_seqlen"):
            if c[name] is not None:
                raise FieldError(name, f"{scheme} with rtn weights reads no calibration data (dynamic activation "
                                       "scales are computed at run time); leave it out")
    return c


RULES = MethodRules(
    quant_method="compressed-tensors",
    title="compressed-tensors",
    fields={
        "scheme": Choice(required=True, choices=tuple(SCHEMES), missing=f"field required ({', '.join(SCHEMES)})",
                         description="llm-compressor's preset scheme"),
        "ignore": Names(description="Linear layers left unquantized: module names or 're:<regex>'; default "
                                    "['lm_head']"),
        "weights": Choice("rtn", choices=("rtn", "gptq"),
                          description="round to nearest, or GPTQ (integer schemes)"),
        "group_size": Integer(minimum=16, maximum=65536, description="W4A16 / W8A16: input channels per scale "
                                                                      f"(default {DEFAULT_GROUP_SIZE})"),
        "smoothing_strength": Number(minimum=0, maximum=1, exclusive=True,
                                     description="W8A8: SmoothQuant's migration strength alpha"),
        "dampening_frac": Number(minimum=0, maximum=1, exclusive=True,
                                 description="GPTQ's damping, a fraction of the Hessian's mean diagonal (0.01)"),
        "dataset": OptionalDataset(required=False),
        "nsamples": Integer(minimum=1, maximum=4096,
                            description="calibration windows; default: the job's options.calibration_samples, "
                                        f"else {DEFAULT_NSAMPLES}"),
        "model_seqlen": Integer(minimum=8, maximum=131072,
                                description="calibration window length; default min(2048, the model's context)"),
        "seed": Integer(0, minimum=0, maximum=2**32 - 1, description="seed of the calibration windows' draw"),
    },
    refused={
        "bits": "compressed-tensors takes a scheme (W4A16, W8A16, W8A8, FP8...), not bits",
        "load_in_4bit": "is a bitsandbytes option; compressed-tensors takes a scheme",
        "load_in_8bit": "is a bitsandbytes option; compressed-tensors takes a scheme",
        "config_groups": "custom config groups are not supported; pick one of the preset schemes with scheme",
        "kv_cache_scheme": "KV-cache quantization is not supported (the written kv_cache_scheme is null)",
        "targets": "the schemes target every Linear layer; leave layers out with ignore",
    },
    combine=_combine,
)


#: model_types whose blocks have SmoothQuant's Llama-style mappings (input_layernorm -> q/k/v_proj,
#: post_attention_layernorm -> gate/up_proj, plain RMSNorm weights)
SMOOTHABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_model(config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """What config.json alone decides: SmoothQuant needs a known mapping; FP8_BLOCK and the grouped schemes
    need a hidden size the blocks / groups divide (else no layer of a decoder block could be quantized)."""
    text = model_config.get("text_config") or model_config
    model_type = str(text.get("model_type") or model_config.get("model_type") or "")
    if config["smoothing_strength"] is not None and model_type not in SMOOTHABLE_MODEL_TYPES:
        raise FieldError("smoothing_strength", f"no SmoothQuant mapping is known for model_type {model_type!r} "
                                               f"(known: {', '.join(SMOOTHABLE_MODEL_TYPES)}); leave it out")
    hidden = text.get("hidden_size")
    if not isinstance(hidden, int):
        return
    if config["scheme"] == "FP8_BLOCK" and hidden % 128:
        raise FieldError("scheme", f"FP8_BLOCK tiles weights in 128x128 blocks; hidden_size {hidden} is not a "
                                   "multiple of 128, so no layer could be quantized (FP8_DYNAMIC takes any shape)")
    if config["scheme"] in GROUPED_SCHEMES and hidden % config["group_size"]:
        raise FieldError("group_size", f"hidden_size {hidden} is not a multiple of group_size "
                                       f"{config['group_size']}, so no layer could be quantized")


def check_sources(config: dict[str, Any], sources: CalibrationSources) -> None:
    """The calibration data, if the config reads any, can be had here (see `calibration.check_source`)."""
    if config.get("dataset") is not None:
        check_source(config["dataset"], sources)


def bits(config: dict[str, Any]) -> int:
    return SCHEMES[config["scheme"]]
