"""`quant_method: "awq"`: transformers' `AwqConfig` fields (its `.to_dict()` is a valid config, plus the
calibration `dataset`), and the AWQ scaling maps of the architectures it can take.

AWQ writes one layout, AutoAWQ's GEMM (`version: "gemm"`: `qweight`/`qzeros` int32 packed along the output
dimension in AWQ's interleaved order, `scales` float16), which transformers, GPTQModel, vLLM and SGLang all
load. GEMV, GEMV_fast, ExLlama and IPEX are other packings of the same numbers; they are refused rather
than written wrongly. GEMM stores a zero point per group, so `zero_point` must stay true.

Besides AwqConfig's own fields (in transformers 5 a GPTQConfig subclass, whose GPTQ fields its `.to_dict()`
carries and AWQ loaders ignore: accepted and kept), six that AutoAWQ's `quantize()` takes or qaas' calibration needs:
`dataset`, `nsamples`, `model_seqlen`, `seed` (as for GPTQ), `duo_scaling` (AutoAWQ's: scales from the
activation *and* weight magnitudes; off = the paper's s = s_x^alpha) and `apply_clip` (the clipping search).

The scaling map (where a per-channel scale can be folded into the preceding operation) depends on the
architecture: `SCALING_MAPS` holds it per `model_type`, as plain data that the engine runs and the API
reads to refuse, at submission, a model it has no map for (`check_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .calibration import CalibrationSources, Dataset, check_source
from .fields import Boolean, Choice, FieldError, Integer, Json, MethodRules, Names, Text

#: Calibration windows when neither `nsamples` nor the job's options.calibration_samples says.
DEFAULT_NSAMPLES = 128
#: AutoAWQ's default calibration window (`max_calib_seq_len`).
DEFAULT_SEQLEN = 512
#: The grid of exponents searched for each scaling group: alpha = 0, 1/20, ..., 19/20 (AutoAWQ's n_grid).
N_GRID = 20
VERSIONS_NOT_WRITTEN = ("gemv", "gemv_fast", "exllama", "ipex", "marlin")


@dataclass(frozen=True)
class ScalingGroup:
    """Layers that read the output of one operation `prev`: a per-input-channel scale s is divided out of
    `prev` (a norm's weight, or the output rows of a Linear) and multiplied into each layer's input columns,
    which leaves the float model unchanged. `inspect` is the submodule whose output the search compares
    (the attention or the MLP for the norms' groups, the layer itself otherwise). Names are block-relative."""

    prev: str
    layers: tuple[str, ...]
    inspect: str
    #: "norm" (prev multiplies its input by a weight vector) or "linear" (prev is a Linear layer).
    prev_kind: str = "norm"
    #: Only when prev's output and every layer's input have the same width (AutoAWQ: v_proj -> o_proj is
    #: skipped under grouped-query attention, where v_proj's output is narrower than o_proj's input).
    when_shapes_match: bool = False


LLAMA_MAP = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_kind="linear",
                 when_shapes_match=True),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_kind="linear"),
)

#: model_type -> its scaling map. The Llama family shares one: RMSNorm computing `weight * x_normed`
#: (Gemma's `(1 + weight)` norm is not in this list for that reason), q/k/v, o, gate/up, down.
SCALING_MAPS: dict[str, tuple[ScalingGroup, ...]] = {
    "llama": LLAMA_MAP,
    "mistral": LLAMA_MAP,
    "qwen2": LLAMA_MAP,
    "qwen3": LLAMA_MAP,
}


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    c["version"] = c["version"].lower()  # AutoAWQ writes "GEMM", transformers "gemm"
    if not c["zero_point"]:
        raise FieldError("zero_point", "the GEMM format stores a zero point per group; zero_point false (symmetric) "
                                       "is not written")
    if c.get("desc_act"):
        raise FieldError("desc_act", "is GPTQ's act-order; AWQ keeps the channel order (leave it false)")
    return c


RULES = MethodRules(
    quant_method="awq",
    title="AWQ",
    fields={
        "bits": Integer(4, choices=(4,), description="weight bits (the GEMM format packs 4-bit codes)"),
        "group_size": Integer(128, choices=(32, 64, 128),
                              description="input channels per scale/zero group (AWQ kernels take 32, 64, 128)"),
        "zero_point": Boolean(True, description="asymmetric groups with a zero point (GEMM needs it)"),
        "version": Choice("gemm", choices=("gemm", "GEMM"), why=(
            f"{', '.join(VERSIONS_NOT_WRITTEN)} are other packings; the service writes AutoAWQ's GEMM layout, "
            "which transformers, GPTQModel, vLLM and SGLang load")),
        "modules_to_not_convert": Names(description="modules kept in float16 (a module whose name contains an "
                                                    "entry, as transformers matches them); the output head always"),
        "dataset": Dataset(),
        "nsamples": Integer(minimum=1, maximum=4096,
                            description="calibration windows (qaas); default: the job's options.calibration_samples, "
                                        f"else {DEFAULT_NSAMPLES}"),
        "model_seqlen": Integer(DEFAULT_SEQLEN, minimum=8, maximum=131072,
                                description="calibration window length (AutoAWQ's max_calib_seq_len)"),
        "seed": Integer(0, minimum=0, maximum=2**32 - 1, description="seed of the calibration windows' draw (qaas)"),
        # True as in AutoAWQ's quantize() and llm-compressor's AWQModifier (both default duo_scaling=True)
        "duo_scaling": Boolean(True, description="AutoAWQ's duo scaling (its default and llm-compressor's): "
                                                 "s = s_x^a / s_w^(1-a); false: the paper's s = s_x^a"),
        "apply_clip": Boolean(True, description="search a per-group clipping range after scaling (AutoAWQ's)"),
    },
    # transformers' AwqConfig is a GPTQConfig: its .to_dict() carries GPTQ's fields, which AWQ loaders ignore;
    # AutoAWQ's own quant_config adds its fusing options. Accepted, kept, without effect on the model.
    loader_fields={
        "backend": Text(max_length=100),
        "tokenizer": Json(types=("string", "object")),
        "damp_percent": Json(types=("number",)),
        "desc_act": Boolean(),
        "act_group_aware": Boolean(),
        "sym": Boolean(),
        "true_sequential": Boolean(),
        "meta": Json(types=("object",)),
        "block_name_to_quantize": Text(max_length=200),
        "module_name_preceding_first_block": Names(),
        "modules_in_block_to_quantize": Json(types=("array",)),
        "batch_size": Integer(minimum=1, maximum=1024),
        "pad_token_id": Integer(minimum=0),
        "max_input_length": Integer(minimum=1),
        "cache_block_outputs": Boolean(),
        "do_fuse": Boolean(),
        "fuse_max_seq_len": Integer(minimum=1),
        "modules_to_fuse": Json(types=("object",)),
        "exllama_config": Json(types=("object",)),
    },
    aliases={"format": "version", "w_bit": "bits", "q_group_size": "group_size"},
    refused={
        "load_in_4bit": "is a bitsandbytes option; AWQ takes bits",
        "load_in_8bit": "is a bitsandbytes option; AWQ takes bits",
        "scheme": "is a compressed-tensors option; AWQ takes bits and group_size",
    },
    combine=_combine,
)


def check_sources(config: dict[str, Any], sources: CalibrationSources) -> None:
    """The calibration data can be had here (see `calibration.check_source`)."""
    check_source(config["dataset"], sources)


def scaling_map(model_config: dict[str, Any]) -> tuple[ScalingGroup, ...] | None:
    """The scaling map for a model's config.json (its `model_type`), or None when AWQ has none for it."""
    return SCALING_MAPS.get(str(model_config.get("model_type") or ""))


def check_model(config: dict[str, Any], model_config: dict[str, Any]) -> None:
    """FieldError naming `model` unless AWQ knows where to fold its scales in this architecture (config.json)."""
    if scaling_map(model_config) is None:
        mt = model_config.get("model_type")
        raise FieldError("model", f"AWQ has no scaling map for model_type {str(mt)[:60]!r} (known: "
                                  f"{', '.join(sorted(SCALING_MAPS))}); use gptq or bitsandbytes for it")


def bits(config: dict[str, Any]) -> int:
    return config["bits"]
