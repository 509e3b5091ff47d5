"""The `quant_method: "gptq"` method: the request, the stages, evaluation (the package docstring says how)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import InvalidConfig
from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, config_bool
from .format import FORMATS, load_saved_weights
from .run import GPTQRun

#: GPTQConfig fields this method uses.
FIELDS = {
    "quant_method", "bits", "group_size", "dataset", "damp_percent", "desc_act", "act_group_aware", "sym",
    "true_sequential", "static_groups", "format", "checkpoint_format", "model_seqlen", "batch_size",
    "modules_in_block_to_quantize", "block_name_to_quantize", "module_name_preceding_first_block",
    "cache_block_outputs",
    # qaas extensions: number of calibration windows and the seed of their draw
    "nsamples", "seed",
}
#: GPTQConfig fields that only matter to a loader or to optimum's own pipeline: accepted and ignored.
IGNORED = {"tokenizer", "pad_token_id", "max_input_length", "backend", "meta", "use_exllama", "exllama_config",
           "use_cuda_fp16", "disable_exllama", "lm_head", "quantizer", "dynamic"}


def _get_int(qc: dict[str, Any], key: str, default: int | None) -> int | None:
    v = qc.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidConfig(f"{key} must be an integer", field=key)
    return v


class GPTQMethod:
    name: ClassVar[str] = "gptq"

    # -- request ---------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        qc = dict(quantization_config)
        for key in qc:
            if key not in FIELDS and key not in IGNORED:
                raise InvalidConfig(f"{key!r} is not a GPTQ option", field=key)
        bits = _get_int(qc, "bits", None)
        if bits not in (2, 3, 4, 8):
            raise InvalidConfig("bits must be 2, 3, 4 or 8", field="bits")
        group_size = _get_int(qc, "group_size", 128)
        if group_size != -1 and group_size <= 0:
            raise InvalidConfig("group_size must be -1 or positive", field="group_size")
        damp = qc.get("damp_percent", 0.1)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise InvalidConfig("damp_percent must be between 0 and 1", field="damp_percent")
        desc_act = config_bool(qc, "desc_act", False)
        gar = config_bool(qc, "act_group_aware", True) and not desc_act and group_size != -1
        fmt = qc.get("format") or qc.get("checkpoint_format") or "gptq"
        if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
            raise InvalidConfig(f"format must be one of {', '.join(FORMATS)}", field="format")
        if qc.get("format") and qc.get("checkpoint_format") and qc["format"].lower() != qc["checkpoint_format"].lower():
            raise InvalidConfig("format and checkpoint_format disagree", field="checkpoint_format")
        seqlen = _get_int(qc, "model_seqlen", None)
        if seqlen is not None and seqlen < 2:
            raise InvalidConfig("model_seqlen must be at least 2", field="model_seqlen")
        batch_size = _get_int(qc, "batch_size", 1)
        if batch_size < 1:
            raise InvalidConfig("batch_size must be at least 1", field="batch_size")
        nsamples = _get_int(qc, "nsamples", 128)
        if nsamples < 1:
            raise InvalidConfig("nsamples must be at least 1", field="nsamples")
        seed = _get_int(qc, "seed", 0)
        dataset = qc.get("dataset")
        if dataset is None:
            raise InvalidConfig(
                "GPTQ needs calibration data: dataset (a list of strings, 'wikitext2'/'c4'/'c4-new', a Hub "
                "dataset id or a local .txt/.jsonl path)", field="dataset")
        if isinstance(dataset, list):
            if not dataset or not all(isinstance(t, str) for t in dataset):
                raise InvalidConfig("dataset as a list must hold strings", field="dataset")
        elif not isinstance(dataset, str) or not dataset.strip():
            raise InvalidConfig("dataset must be a list of strings or a name", field="dataset")
        mib = qc.get("modules_in_block_to_quantize")
        if mib is not None:
            if (not isinstance(mib, list) or not mib
                    or not all(isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in mib)):
                raise InvalidConfig("modules_in_block_to_quantize must be a list of lists of module names",
                                    field="modules_in_block_to_quantize")
        for key in ("block_name_to_quantize",):
            if qc.get(key) is not None and not isinstance(qc[key], str):
                raise InvalidConfig(f"{key} must be a string", field=key)
        mp = qc.get("module_name_preceding_first_block")
        if mp is not None and not (isinstance(mp, list) and all(isinstance(n, str) for n in mp)):
            raise InvalidConfig("module_name_preceding_first_block must be a list of names",
                                field="module_name_preceding_first_block")
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "dataset": dataset,
            "damp_percent": float(damp),
            "desc_act": desc_act,
            "act_group_aware": gar,
            "sym": config_bool(qc, "sym", True),
            "true_sequential": config_bool(qc, "true_sequential", True),
            "static_groups": config_bool(qc, "static_groups", False),
            "format": fmt.lower(),
            "model_seqlen": seqlen,
            "batch_size": batch_size,
            "nsamples": nsamples,
            "seed": seed,
            "modules_in_block_to_quantize": mib,
            "block_name_to_quantize": qc.get("block_name_to_quantize"),
            "module_name_preceding_first_block": mp,
            "cache_block_outputs": config_bool(qc, "cache_block_outputs", True),
        }

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"]

    def quantize(self, ctx: EngineContext) -> MethodResult:
        run = GPTQRun(ctx)
        calib = run.calibrate()
        inputs = run.capture_first_block_inputs(calib)
        run.quantize_blocks(inputs)
        del inputs
        run.write_tensors_after_blocks()
        return run.result(calib)

    # -- evaluation ----------------------------------------------------------------------------------------
    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """The saved checkpoint dequantized into the original architecture (GPTQ kernels need optimum or
        GPTQModel, which the engine does not depend on)."""
        info = ctx.state.get("gptq") or {}
        bits = info.get("bits", ctx.quantization_config["bits"])
        fmt = info.get("format", ctx.quantization_config["format"])

        def replace(model: torch.nn.Module) -> None:
            load_saved_weights(model, out_dir, bits=bits, fmt=fmt)

        model = load_with_replaced_weights(ctx.source_dir, replace, device=ctx.device,
                                           allow_remote_code=ctx.options.allow_remote_code)
        return model, "dequantized GPTQ weights in the original architecture"
