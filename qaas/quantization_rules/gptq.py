"""`quant_method: "gptq"`: transformers' `GPTQConfig` fields (its `.to_dict()` is a valid config), plus two
qaas fields: `nsamples` (calibration windows) and `seed` (of their draw)."""

from __future__ import annotations

from typing import Any

from .calibration import CalibrationSources, Dataset, check_source
from .fields import Boolean, Choice, FieldError, Integer, Json, MethodRules, Names, Number, Text

FORMATS = ("gptq", "gptq_v2")
#: Calibration windows when neither `nsamples` nor the job's options.calibration_samples says.
DEFAULT_NSAMPLES = 128


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    if c["lm_head"]:
        raise FieldError("lm_head", "quantizing the output head is not supported; leave it false")
    # GPTQModel's group-aware reordering needs groups, and act-order (desc_act) replaces it.
    c["act_group_aware"] = c["act_group_aware"] and not c["desc_act"] and c["group_size"] != -1
    return c


RULES = MethodRules(
    quant_method="gptq",
    title="GPTQ",
    fields={
        "bits": Integer(required=True, choices=(2, 3, 4, 8), missing="field required (2, 3, 4 or 8)"),
        "group_size": Integer(128, minimum=1, maximum=65536, also=(-1,),
                              description="input channels per scale/zero group; -1: one group per row"),
        "dataset": Dataset(),
        "damp_percent": Number(0.1, minimum=0, maximum=1, exclusive=True,
                               description="Hessian damping, a fraction of its mean diagonal"),
        "desc_act": Boolean(False, description="act-order: quantize columns by decreasing Hessian diagonal"),
        "act_group_aware": Boolean(True, description="GPTQModel's group-aware reordering (off with desc_act "
                                                     "or group_size -1)"),
        "sym": Boolean(True),
        "true_sequential": Boolean(True),
        "static_groups": Boolean(False),
        "format": Choice("gptq", choices=FORMATS, description="checkpoint format: gptq (v1) or gptq_v2"),
        "model_seqlen": Integer(minimum=8, maximum=131072,
                                description="calibration window length; default min(2048, the model's context)"),
        "batch_size": Integer(1, minimum=1, maximum=1024),
        "nsamples": Integer(minimum=1, maximum=4096,
                            description="calibration windows (qaas); default: the job's options.calibration_samples, "
                                        f"else {DEFAULT_NSAMPLES}"),
        "seed": Integer(0, minimum=0, maximum=2**32 - 1, description="seed of the calibration windows' draw (qaas)"),
        "modules_in_block_to_quantize": Names(nested=True),
        "block_name_to_quantize": Text(max_length=200),
        "module_name_preceding_first_block": Names(),
        "cache_block_outputs": Boolean(True),
        "lm_head": Boolean(False, description="quantize the output head: not supported"),
    },
    loader_fields={
        "tokenizer": Json(types=("string", "object")),
        "backend": Text(max_length=100),
        "use_exllama": Boolean(),
        "disable_exllama": Boolean(),
        "exllama_config": Json(types=("object",)),
        "use_cuda_fp16": Boolean(),
        "max_input_length": Integer(minimum=1),
        "pad_token_id": Integer(minimum=0),
        "meta": Json(types=("object",)),
        "quantizer": Json(types=("string", "array")),
        "dynamic": Json(types=("object",)),
    },
    aliases={"checkpoint_format": "format"},
    refused={
        "load_in_4bit": "is a bitsandbytes option; GPTQ takes bits",
        "load_in_8bit": "is a bitsandbytes option; GPTQ takes bits",
    },
    combine=_combine,
)


def written_format(config: dict[str, Any]) -> tuple[str, str | None]:
    """The checkpoint format qaas writes for a normalized config, and why when it is not the one asked.

    Asymmetric outputs are always `gptq_v2`: a v1 file stores `zero - 1`, and GPTQModel (which transformers
    loads GPTQ through) both refuses asymmetric v1 unless `meta.quantizer` names gptqmodel >= 0.9.0
    (`models/loader.py`) and converts v1 by adding 0x11111111 to each qzeros word with carry
    (`utils/model.py: convert_gptq_v1_to_v2_format_module`), which misreads every zero point of 0. `gptq_v2`
    stores the true zero and reads back exactly. `GPTQConfig(sym=False).to_dict()` says `format: "gptq"`
    (its default), so the request is honoured this way rather than refused.
    """
    asked = config["format"]
    if not config["sym"] and asked == "gptq":
        return "gptq_v2", ("sym=false is written as gptq_v2 (true zero points): GPTQModel, and transformers through "
                           "it, refuse or misread asymmetric v1 (zero - 1 with a word-wide carry on load)")
    return asked, None


def check_sources(config: dict[str, Any], sources: CalibrationSources) -> None:
    """The calibration data can be had here (see `calibration.check_source`)."""
    check_source(config["dataset"], sources)


def bits(config: dict[str, Any]) -> int:
    return config["bits"]
