"""The `quant_method: "bitsandbytes"` method: the request, the block loop, evaluation (the package docstring
says what is written and why)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...architecture import Unit
from ...errors import InvalidConfig
from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, config_bool
from .format import bnb_config_dict, dequantizing_replacer, quantize_weight
from .planning import plan

FIELDS = {
    "quant_method", "load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit",
    "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


class BitsAndBytesMethod:
    """The `quant_method: "bitsandbytes"` method (see module docstring)."""

    name: ClassVar[str] = "bitsandbytes"

    # -- request -------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        """Normalized BitsAndBytesConfig fields (the constructor's argument names), defaults filled in."""
        qc = dict(quantization_config)
        for key in qc:
            if key not in FIELDS:
                hint = " (bitsandbytes takes load_in_4bit or load_in_8bit)" if key == "bits" else ""
                raise InvalidConfig(f"{key!r} is not a bitsandbytes option{hint}", field=key)
        for key in ("load_in_4bit", "load_in_8bit"):
            if key not in qc and f"_{key}" in qc:
                qc[key] = qc[f"_{key}"]
            if f"_{key}" in qc and qc[f"_{key}"] != qc.get(key):
                raise InvalidConfig(f"_{key} and {key} disagree", field=key)
        four = config_bool(qc, "load_in_4bit", False)
        eight = config_bool(qc, "load_in_8bit", False)
        if four and eight:
            raise InvalidConfig("load_in_4bit and load_in_8bit cannot both be true", field="load_in_4bit")
        if not (four or eight):
            raise InvalidConfig("set load_in_4bit or load_in_8bit to true", field="load_in_4bit")
        qtype = qc.get("bnb_4bit_quant_type") or "fp4"
        if qtype not in ("nf4", "fp4"):
            raise InvalidConfig(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', not {qtype!r}", field="bnb_4bit_quant_type")
        compute = qc.get("bnb_4bit_compute_dtype") or "float32"
        if compute not in COMPUTE_DTYPES:
            raise InvalidConfig(
                f"bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute!r}",
                field="bnb_4bit_compute_dtype",
            )
        storage = qc.get("bnb_4bit_quant_storage") or "uint8"
        if storage != "uint8":
            raise InvalidConfig(
                f"bnb_4bit_quant_storage {storage!r} is not supported: only 'uint8' (the default) is written "
                "(other storage dtypes exist for FSDP training and are not needed for inference)",
                field="bnb_4bit_quant_storage",
            )
        threshold = qc.get("llm_int8_threshold", 6.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise InvalidConfig("llm_int8_threshold must be a non-negative number", field="llm_int8_threshold")
        skip = qc.get("llm_int8_skip_modules")
        if skip is not None and (not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip)):
            raise InvalidConfig("llm_int8_skip_modules must be a list of module names", field="llm_int8_skip_modules")
        has_fp16 = config_bool(qc, "llm_int8_has_fp16_weight", False)
        if eight and has_fp16:
            raise InvalidConfig(
                "llm_int8_has_fp16_weight=true keeps 8-bit layers in float16 for training; an ahead-of-time "
                "8-bit export stores int8 weights, so it must be false",
                field="llm_int8_has_fp16_weight",
            )
        fields = {
            "load_in_4bit": four,
            "load_in_8bit": eight,
            "llm_int8_threshold": float(threshold),
            "llm_int8_skip_modules": list(skip) if skip is not None else None,
            "llm_int8_enable_fp32_cpu_offload": config_bool(qc, "llm_int8_enable_fp32_cpu_offload", False),
            "llm_int8_has_fp16_weight": has_fp16,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_type": qtype,
            "bnb_4bit_use_double_quant": config_bool(qc, "bnb_4bit_use_double_quant", False),
            "bnb_4bit_quant_storage": storage,
        }
        try:
            bnb_config_dict(fields)
        except (TypeError, ValueError) as exc:
            raise InvalidConfig(f"invalid bitsandbytes config: {exc}") from None
        return fields

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["quantize"]

    # -- conversion ----------------------------------------------------------------------------------
    def quantize(self, ctx: EngineContext) -> MethodResult:
        fields = ctx.quantization_config
        to_quantize, kept = plan(fields, ctx.layout)
        reporter = ctx.reporter
        for name, why in sorted(kept.items()):
            reporter.log(f"{name}: {why}", level="warning" if "CPU" in why else "info", data={"module": name})
        errors: dict[str, float] = {}
        n_blocks = ctx.layout.num_blocks
        done = 0
        for unit in ctx.layout.units():
            reporter.check_cancelled()
            unit_errors = self._convert_unit(ctx, unit, to_quantize)
            errors.update(unit_errors)
            if unit.kind == "block":
                done += 1
                metrics: dict[str, Any] = {"block": unit.block.index, "rel_error": unit_errors}
                if unit_errors:
                    metrics["max_rel_error"] = max(unit_errors.values())
                reporter.progress(done, n_blocks, message=f"block {done}/{n_blocks}", metrics=metrics)
        skip_list = sorted(kept)
        config = bnb_config_dict(dict(fields, llm_int8_skip_modules=skip_list))
        notes = [f"{n}: {why}" for n, why in sorted(kept.items())]  # already logged above
        return MethodResult(
            quantization_config=config,
            skipped_modules=skip_list,
            quantized_modules=sorted(to_quantize),
            layer_errors=errors,
            notes=notes,
        )

    @staticmethod
    def _convert_unit(ctx: EngineContext, unit: Unit, to_quantize: set[str]) -> dict[str, float]:
        """Write every tensor of one unit (embeddings, a block, the head): converted layers as their
        bitsandbytes tensors, the rest as they are. Returns the relative error of each converted layer."""
        linears = {l.weight_name: l for l in unit.linears if l.name in to_quantize}
        tensors = ctx.reader.load_many(unit.tensor_names)
        errors: dict[str, float] = {}
        for tname in list(tensors):
            w = tensors.pop(tname)
            li = linears.get(tname)
            if li is None:
                ctx.writer.add(tname, w)
                continue
            src = w.to(ctx.device)
            if li.transposed:  # Conv1D stores [in, out]; the quantized layer is [out, in]
                src = src.t()
            converted, errors[li.name] = quantize_weight(tname, src.contiguous(), ctx.quantization_config)
            ctx.writer.add_many(converted)
            del w, src, converted
        return errors

    # -- evaluation ----------------------------------------------------------------------------------
    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """transformers + bitsandbytes when importable and working on the device; else the original
        architecture with dequantized weights."""
        reason = ""
        try:
            import bitsandbytes  # noqa: F401
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(out_dir), device_map={"": str(ctx.device)}, trust_remote_code=ctx.options.allow_remote_code
            ).eval()
            with torch.no_grad():  # smoke test: the kernels must run on this device
                model(torch.tensor([[1, 2]], device=ctx.device), use_cache=False)
            return model, "transformers+bitsandbytes"
        except ImportError as exc:
            reason = f"bitsandbytes not importable ({exc})"
        except Exception as exc:  # a kernel that does not run here: measure the same weights another way
            reason = f"transformers+bitsandbytes failed on {ctx.device} ({type(exc).__name__}: {exc})"
        ctx.reporter.log(f"evaluating dequantized weights: {reason}", level="warning")
        replace = dequantizing_replacer(out_dir, ctx.state.get("quantized_modules") or [], ctx.layout)
        model = load_with_replaced_weights(
            ctx.source_dir, replace, device=ctx.device, allow_remote_code=ctx.options.allow_remote_code
        )
        return model, "dequantized weights in the original architecture"
