"""bitsandbytes quantization (NF4 / FP4, optional double quantization, and LLM.int8), done ahead of time.

The output is what `from_pretrained(source, quantization_config=BitsAndBytesConfig(...))` followed by
`save_pretrained` would write, tensor for tensor (FORMATS.md §2-§4), but produced one decoder block at a
time through the project's kernels (`qaas.kernels.bnb4`, `qaas.kernels.int8`), which are byte-exact with
bitsandbytes on the device they run on. bitsandbytes itself is needed only to evaluate the result.

Which Linear layers are converted is decided exactly as transformers decides it (every `nn.Linear` /
`Conv1D` of the model class except `llm_int8_skip_modules`, or transformers' default skips when that is
None, plus the class's `_keep_in_fp32_modules`), with one addition for 4-bit: layers whose shape
bitsandbytes' CPU inference path cannot run (it repacks weights for its AVX512-BF16 kernel and asserts
`out_features % 32 == 0` and `in_features % blocksize == 0`; stories260K's MLP with 172 fails with
"N must be divisible by block_n") stay in floating point, so the export loads and runs on any device.
Every Linear kept in floating point is listed by full name in `llm_int8_skip_modules` of the written config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InvalidConfig, UnsupportedModel
from ..evaluate import relative_error
from .base import EngineContext, MethodResult, config_bool

BLOCKSIZE = 64  # bitsandbytes' Params4bit default (CUDA and CPU)
#: bitsandbytes' CPU 4-bit inference packs weights in groups of 32 output rows (functional.py).
CPU_BLOCK_N = 32

FIELDS = {
    "quant_method", "load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit",
    "llm_int8_threshold", "llm_int8_skip_modules", "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def bnb_config_dict(fields: dict[str, Any]) -> dict[str, Any]:
    """`BitsAndBytesConfig(**fields).to_dict()` as it lands in config.json (JSON types only)."""
    from transformers import BitsAndBytesConfig

    return json.loads(json.dumps(BitsAndBytesConfig(**fields).to_dict()))


def cpu_runnable_4bit(in_features: int, out_features: int, blocksize: int = BLOCKSIZE) -> str | None:
    """None if bitsandbytes' CPU 4-bit inference can run this shape, else the reason it cannot."""
    if out_features % CPU_BLOCK_N:
        return f"out_features {out_features} is not a multiple of {CPU_BLOCK_N}"
    if in_features % blocksize:
        return f"in_features {in_features} is not a multiple of the block size {blocksize}"
    return None


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

    # -- which layers --------------------------------------------------------------------------------
    def plan(self, ctx: EngineContext) -> tuple[set[str], dict[str, str]]:
        """(module names to quantize, {module name kept in float: why})."""
        from transformers.quantizers.quantizers_utils import should_convert_module

        fields = ctx.quantization_config
        layout = ctx.layout
        user_skip = fields["llm_int8_skip_modules"]
        patterns = list(user_skip) if user_skip is not None else list(layout.default_skip_modules)
        patterns += list(layout.keep_in_fp32_modules)
        stored = {l.name: l for l in layout.all_linears()}
        # Linear modules of the class whose weight is not stored (a tied head) are never converted here.
        from transformers.pytorch_utils import Conv1D

        all_modules = [
            n for n, m in layout.meta_model.named_modules() if type(m) is torch.nn.Linear or isinstance(m, Conv1D)
        ]
        quantize: set[str] = set()
        kept: dict[str, str] = {}
        for name in all_modules:
            if not should_convert_module(name, patterns):
                kept[name] = "skipped (llm_int8_skip_modules)" if user_skip is not None else "skipped by default (output head / tied / last module)"
                continue
            li = stored.get(name)
            if li is None:
                kept[name] = "weight not stored (tied)"
                continue
            if fields["load_in_4bit"]:
                why = cpu_runnable_4bit(li.in_features, li.out_features)
                if why:
                    kept[name] = f"kept in float: bitsandbytes' CPU 4-bit kernel cannot run it ({why})"
                    continue
            quantize.add(name)
        # The written list must make transformers convert exactly `quantize`: check with its own matcher.
        written = sorted(kept)
        for name in quantize:
            if not should_convert_module(name, written):
                raise UnsupportedModel(f"module {name} would be matched by llm_int8_skip_modules {written}")
        return quantize, kept

    # -- conversion ----------------------------------------------------------------------------------
    def quantize(self, ctx: EngineContext) -> MethodResult:
        from qaas.kernels.bnb4 import dequantize_4bit, quantize_4bit
        from qaas.kernels.int8 import dequantize_int8_rowwise, quantize_int8_rowwise

        fields = ctx.quantization_config
        four = fields["load_in_4bit"]
        to_quantize, kept = self.plan(ctx)
        reporter = ctx.reporter
        for name, why in sorted(kept.items()):
            reporter.log(f"{name}: {why}", level="warning" if "CPU" in why else "info", data={"module": name})
        errors: dict[str, float] = {}
        units = list(ctx.layout.units())
        n_blocks = ctx.layout.num_blocks
        done = 0
        for unit in units:
            reporter.check_cancelled()
            linears = {l.weight_name: l for l in unit.linears if l.name in to_quantize}
            tensors = ctx.reader.load_many(unit.tensor_names)
            unit_errors: dict[str, float] = {}
            for tname in list(tensors):
                w = tensors.pop(tname)
                li = linears.get(tname)
                if li is None:
                    ctx.writer.add(tname, w)
                    del w
                    continue
                src = w.to(ctx.device)
                if li.transposed:  # Conv1D stores [in, out]; the quantized layer is [out, in]
                    src = src.t()
                src = src.contiguous()
                if four:
                    packed, state = quantize_4bit(
                        src,
                        blocksize=BLOCKSIZE,
                        quant_type=fields["bnb_4bit_quant_type"],
                        compress_statistics=fields["bnb_4bit_use_double_quant"],
                    )
                    ctx.writer.add(tname, packed)
                    ctx.writer.add_many(state.as_state_dict(prefix=tname))
                    err = relative_error(src, dequantize_4bit(packed, state))
                else:
                    # Int8Params quantizes a float16 copy of the weight; so do we, for the same bytes.
                    half = src.to(torch.float16)
                    q, scb = quantize_int8_rowwise(half)
                    ctx.writer.add(tname, q)
                    ctx.writer.add(li.name + ".SCB", scb)
                    ctx.writer.add(li.name + ".weight_format", torch.tensor(0, dtype=torch.uint8))
                    err = relative_error(src, dequantize_int8_rowwise(q, scb, torch.float32))
                unit_errors[li.name] = err
                del w, src
            errors.update(unit_errors)
            del tensors
            if unit.kind == "block":
                done += 1
                metrics: dict[str, Any] = {"block": unit.block.index, "rel_error": unit_errors}
                if unit_errors:
                    metrics["max_rel_error"] = max(unit_errors.values())
                reporter.progress(done, n_blocks, message=f"block {done}/{n_blocks}", metrics=metrics)
        skip_list = sorted(kept)
        written = dict(fields, llm_int8_skip_modules=skip_list)
        config = bnb_config_dict(written)
        notes = [f"{n}: {why}" for n, why in sorted(kept.items())]  # already logged above
        return MethodResult(
            quantization_config=config,
            skipped_modules=skip_list,
            quantized_modules=sorted(to_quantize),
            layer_errors=errors,
            notes=notes,
        )

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
        from ..evaluate import load_with_replaced_weights

        replace = dequantizing_replacer(out_dir, ctx.state.get("quantized_modules") or [], ctx.layout)
        model = load_with_replaced_weights(
            ctx.source_dir, replace, device=ctx.device, allow_remote_code=ctx.options.allow_remote_code
        )
        return model, "dequantized weights in the original architecture"


def dequantizing_replacer(out_dir: Path, modules: list[str], layout: Any):
    """A function that puts the dequantized weights stored in `out_dir` into a float model."""
    from qaas.kernels.bnb4 import QuantState4bit, dequantize_4bit
    from qaas.kernels.int8 import dequantize_int8_rowwise

    from ..checkpoint import CheckpointReader

    transposed = {l.name for l in layout.all_linears() if l.transposed}

    def replace(model: torch.nn.Module) -> None:
        reader = CheckpointReader(out_dir)
        for name in modules:
            module = model.get_submodule(name)
            wname = name + ".weight"
            if name + ".SCB" in reader:
                w = dequantize_int8_rowwise(reader.load(wname), reader.load(name + ".SCB"), torch.float32)
            else:
                blob_key = next(k for k in reader.names_with_prefix(wname + ".quant_state") if "bitsandbytes__" in k)
                meta = json.loads(bytes(reader.load(blob_key).tolist()).decode())
                nested = meta.get("nested_offset") is not None
                state = QuantState4bit(
                    absmax=reader.load(wname + ".absmax"),
                    code=reader.load(wname + ".quant_map"),
                    blocksize=meta["blocksize"],
                    quant_type=meta["quant_type"],
                    dtype=getattr(torch, meta["dtype"]),
                    shape=tuple(meta["shape"]),
                    offset=meta.get("nested_offset"),
                    nested_absmax=reader.load(wname + ".nested_absmax") if nested else None,
                    nested_code=reader.load(wname + ".nested_quant_map") if nested else None,
                    nested_blocksize=meta.get("nested_blocksize", 256),
                )
                w = dequantize_4bit(reader.load(wname), state)
            if name in transposed:
                w = w.t()
            module.weight.data = w.to(module.weight.dtype).contiguous()
        reader.close()

    return replace
