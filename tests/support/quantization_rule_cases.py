"""quantization_configs and the verdict every surface must give: None (accepted) or the field a 422 names.

The registered local copy ("wikitext2") and the allowed roots are the ones `make_settings` and the tests set
up; a named dataset without a local copy is refused (the tests switch the hub off)."""

from __future__ import annotations

import json

from conftest import SHAKESPEARE

TEXTS = [SHAKESPEARE.read_text()[:3000]] if SHAKESPEARE.is_file() else ["calibration text " * 200]
GPTQ = {"quant_method": "gptq", "bits": 4, "dataset": TEXTS}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm", "dataset": TEXTS}
CT = {"quant_method": "compressed-tensors"}


def config_of(row_config: dict | str) -> dict:
    """A row's config; "gptq-to-dict" / "bnb-to-dict" / "awq-to-dict" stand for transformers' own `.to_dict()`
    output."""
    if isinstance(row_config, dict):
        return row_config
    from transformers import AwqConfig, BitsAndBytesConfig, GPTQConfig

    if row_config == "gptq-to-dict":
        return json.loads(json.dumps(GPTQConfig(bits=4, dataset=TEXTS).to_dict()))
    if row_config == "awq-to-dict":
        return json.loads(json.dumps(AwqConfig(bits=4, group_size=64, dataset=TEXTS).to_dict()))
    return json.loads(json.dumps(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()))


ROWS = [
    # accepted
    ("gptq-minimal", GPTQ, None),
    ("gptq-to-dict", "gptq-to-dict", None),
    ("gptq-file-in-roots", {**GPTQ, "dataset": str(SHAKESPEARE)}, None),
    ("gptq-registered-copy", {**GPTQ, "dataset": "wikitext2"}, None),
    ("gptq-act-order-v2", {**GPTQ, "desc_act": True, "format": "gptq_v2", "checkpoint_format": "gptq_v2",
                           "group_size": -1}, None),
    ("gptq-qaas-fields", {**GPTQ, "nsamples": 8, "seed": 3, "model_seqlen": 8}, None),
    ("gptq-loader-fields", {**GPTQ, "lm_head": False, "use_exllama": False, "backend": "auto", "meta": {"a": 1},
                            "dynamic": {}}, None),
    ("bnb-nf4-double-quant", {**NF4, "bnb_4bit_use_double_quant": True}, None),
    ("bnb-to-dict", "bnb-to-dict", None),
    ("bnb-int8-skips", {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]},
     None),
    # refused: where the two sets of rules had drifted
    ("drift-model-seqlen-4", {**GPTQ, "model_seqlen": 4}, "model_seqlen"),
    ("drift-group-size-huge", {**GPTQ, "group_size": 100000}, "group_size"),
    ("drift-lm-head", {**GPTQ, "lm_head": True}, "lm_head"),
    ("drift-nsamples-0", {**GPTQ, "nsamples": 0}, "nsamples"),
    # refused: calibration data (issue 11)
    ("dataset-named-unavailable", {**GPTQ, "dataset": "c4"}, "dataset"),
    ("dataset-hub-id-unavailable", {**GPTQ, "dataset": "allenai/c4"}, "dataset"),
    ("dataset-bad-hub-id", {**GPTQ, "dataset": "org//name"}, "dataset"),
    ("dataset-unknown-name", {**GPTQ, "dataset": "wikitext3"}, "dataset"),
    ("dataset-tiny", {**GPTQ, "dataset": ["one two three"]}, "dataset"),
    ("dataset-file-outside-roots", {**GPTQ, "dataset": "/etc/hostname"}, "dataset"),
    ("dataset-file-relative", {**GPTQ, "dataset": "calib.txt"}, "dataset"),
    ("dataset-missing", {"quant_method": "gptq", "bits": 4}, "dataset"),
    # refused: GPTQ fields
    ("gptq-bits-5", {**GPTQ, "bits": 5}, "bits"),
    ("gptq-bits-string", {**GPTQ, "bits": "4"}, "bits"),
    ("gptq-group-size-0", {**GPTQ, "group_size": 0}, "group_size"),
    ("gptq-damp-1", {**GPTQ, "damp_percent": 1}, "damp_percent"),
    ("gptq-desc-act-string", {**GPTQ, "desc_act": "false"}, "desc_act"),
    ("gptq-format-unknown", {**GPTQ, "format": "exl2"}, "format"),
    ("gptq-formats-disagree", {**GPTQ, "format": "gptq", "checkpoint_format": "gptq_v2"}, "checkpoint_format"),
    ("gptq-modules-empty-group", {**GPTQ, "modules_in_block_to_quantize": [[]]}, "modules_in_block_to_quantize.0"),
    ("gptq-unknown-field", {**GPTQ, "surprise": 1}, "surprise"),
    ("gptq-bnb-field", {**GPTQ, "load_in_4bit": True}, "load_in_4bit"),
    # refused: bitsandbytes fields
    ("bnb-both-modes", {**NF4, "load_in_8bit": True}, "load_in_4bit"),
    ("bnb-no-mode", {"quant_method": "bitsandbytes"}, "load_in_4bit"),
    ("bnb-bits", {**NF4, "bits": 4}, "bits"),
    ("bnb-dataset", {**NF4, "dataset": TEXTS}, "dataset"),
    ("bnb-storage", {**NF4, "bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage"),
    ("bnb-compute-int8", {**NF4, "bnb_4bit_compute_dtype": "int8"}, "bnb_4bit_compute_dtype"),
    ("bnb-threshold-negative", {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": -1},
     "llm_int8_threshold"),
    ("bnb-fp16-weight-int8", {"quant_method": "bitsandbytes", "load_in_8bit": True,
                              "llm_int8_has_fp16_weight": True}, "llm_int8_has_fp16_weight"),
    ("bnb-private-twin-disagrees", {**NF4, "_load_in_4bit": False}, "_load_in_4bit"),
    ("bnb-skip-modules-string", {**NF4, "llm_int8_skip_modules": "lm_head"}, "llm_int8_skip_modules"),
    # AWQ (transformers' AwqConfig fields; AutoAWQ's quant_config spellings)
    ("awq-minimal", {"quant_method": "awq", "dataset": TEXTS}, None),
    ("awq-full", {**AWQ, "modules_to_not_convert": ["lm_head", "mlp.down_proj"], "nsamples": 16,
                  "model_seqlen": 256, "seed": 1, "duo_scaling": False, "apply_clip": False}, None),
    ("awq-to-dict", "awq-to-dict", None),
    ("awq-autoawq-spelling", {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM",
                              "zero_point": True, "dataset": TEXTS}, None),
    ("awq-file", {**AWQ, "dataset": str(SHAKESPEARE)}, None),
    ("awq-bits-3", {**AWQ, "bits": 3}, "bits"),
    ("awq-group-size-96", {**AWQ, "group_size": 96}, "group_size"),
    ("awq-gemv", {**AWQ, "version": "gemv"}, "version"),
    ("awq-exllama", {**AWQ, "version": "exllama"}, "version"),
    ("awq-no-zero-point", {**AWQ, "zero_point": False}, "zero_point"),
    ("awq-desc-act", {**AWQ, "desc_act": True}, "desc_act"),
    ("awq-format-disagrees", {**AWQ, "format": "gemv"}, "format"),
    ("awq-no-dataset", {"quant_method": "awq", "bits": 4}, "dataset"),
    ("awq-dataset-unavailable", {**AWQ, "dataset": "c4"}, "dataset"),
    ("awq-bnb-field", {**AWQ, "load_in_4bit": True}, "load_in_4bit"),
    ("awq-unknown-field", {**AWQ, "surprise": 1}, "surprise"),
    # compressed-tensors (llm-compressor's preset schemes)
    ("ct-fp8-dynamic", {**CT, "scheme": "FP8_DYNAMIC"}, None),
    ("ct-fp8-ignore-regex", {**CT, "scheme": "FP8_DYNAMIC", "ignore": ["lm_head", "re:.*mlp.down_proj$"]}, None),
    ("ct-fp8-static", {**CT, "scheme": "FP8", "dataset": TEXTS, "nsamples": 4}, None),
    ("ct-w4a16-gptq", {**CT, "scheme": "W4A16", "weights": "gptq", "group_size": 64, "dataset": TEXTS}, None),
    ("ct-w8a8-smoothquant", {**CT, "scheme": "W8A8", "smoothing_strength": 0.8, "dataset": "wikitext2"}, None),
    ("ct-scheme-missing", dict(CT), "scheme"),
    ("ct-scheme-unknown", {**CT, "scheme": "NVFP4"}, "scheme"),
    ("ct-fp8-static-no-dataset", {**CT, "scheme": "FP8"}, "dataset"),
    ("ct-dynamic-with-dataset", {**CT, "scheme": "FP8_DYNAMIC", "dataset": TEXTS}, "dataset"),
    ("ct-gptq-fp8", {**CT, "scheme": "FP8_DYNAMIC", "weights": "gptq", "dataset": TEXTS}, "weights"),
    ("ct-smoothing-w4a16", {**CT, "scheme": "W4A16", "smoothing_strength": 0.5, "dataset": TEXTS},
     "smoothing_strength"),
    ("ct-smoothing-1", {**CT, "scheme": "W8A8", "smoothing_strength": 1.0, "dataset": TEXTS}, "smoothing_strength"),
    ("ct-group-size-fp8", {**CT, "scheme": "FP8_DYNAMIC", "group_size": 128}, "group_size"),
    ("ct-ignore-bad-regex", {**CT, "scheme": "W8A16", "ignore": ["re:(("]}, "ignore.0"),
    ("ct-bits", {**CT, "scheme": "W4A16", "bits": 4}, "bits"),
    ("ct-config-groups", {**CT, "scheme": "W4A16", "config_groups": {}}, "config_groups"),
    ("ct-dampening-rtn", {**CT, "scheme": "W4A16", "dampening_frac": 0.1}, "dampening_frac"),
    # GGUF
    ("gguf-types", {"quant_method": "gguf", "types": ["Q4_K_M", "Q8_0"]}, None),
    ("gguf-unknown-type", {"quant_method": "gguf", "types": ["Q8_0", "Q4_K_X"]}, "types.1"),
    ("gguf-iq2-not-produced", {"quant_method": "gguf", "types": ["IQ2_XXS"]}, "types.0"),
    ("gguf-split-size", {"quant_method": "gguf", "types": ["Q8_0"], "split_max_size": "huge"}, "split_max_size"),
    # refused: the method
    ("method-unknown", {"quant_method": "hqq", "bits": 4}, "quant_method"),
    ("method-missing", {"bits": 4, "dataset": TEXTS}, "quant_method"),
]


def accepted() -> list[tuple[str, dict]]:
    return [(name, config_of(qc)) for name, qc, field in ROWS if field is None]
