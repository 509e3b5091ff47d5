"""The `quant_method: "bitsandbytes"` method: the request, the block loop, evaluation (the package docstring
says what is written and why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ...architecture import Unit
from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, validated_config
from .format import bnb_config_dict, dequantizing_replacer, quantize_weight, read_weight
from .planning import plan


def runs_on(gpu_only: dict[str, str]) -> dict[str, Any]:
    """The job result's `runs_on`: the devices transformers + bitsandbytes are sure to run the output on. CUDA
    always (the checkpoint is what `BitsAndBytesConfig` gives there); the CPU only when no converted layer has
    a shape its repacked 4-bit CPU kernel rejects (`options.cpu_compatible` keeps such layers in float)."""
    if not gpu_only:
        return {"devices": ["cuda", "cpu"], "note": "runs on CUDA and on the CPU"}
    shown = ", ".join(f"{n} ({why})" for n, why in sorted(gpu_only.items())[:4])
    more = f" and {len(gpu_only) - 4} more" if len(gpu_only) > 4 else ""
    return {"devices": ["cuda"], "cpu_unsupported_modules": sorted(gpu_only),
            "note": f"runs on CUDA; on the CPU, bitsandbytes' repacked 4-bit kernel (AVX512-BF16) asserts shapes "
                    f"that {shown}{more} do not have (which CPU path bitsandbytes takes depends on the machine); "
                    "options.cpu_compatible=true keeps such layers in float so the output runs on any CPU"}


class BitsAndBytesMethod:
    """The `quant_method: "bitsandbytes"` method (see module docstring)."""

    name: ClassVar[str] = "bitsandbytes"

    # -- request -------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        """The normalized BitsAndBytesConfig fields (the constructor's argument names), defaults filled in."""
        return validated_config(quantization_config)

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["quantize"]

    # -- conversion ----------------------------------------------------------------------------------
    def quantize(self, ctx: EngineContext) -> MethodResult:
        fields = ctx.quantization_config
        to_quantize, kept, gpu_only = plan(fields, ctx.layout, cpu_compatible=ctx.options.cpu_compatible)
        reporter = ctx.reporter
        for name, why in sorted(kept.items()):
            reporter.log(f"{name}: {why}", level="warning" if "CPU" in why else "info", data={"module": name})
        devices = runs_on(gpu_only)
        if gpu_only:
            reporter.log(devices["note"], level="warning", data={"modules": sorted(gpu_only)})
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
        if gpu_only:
            notes.append(devices["note"])
        return MethodResult(
            quantization_config=config,
            skipped_modules=skip_list,
            quantized_modules=sorted(to_quantize),
            layer_errors=errors,
            notes=notes,
            details={"runs_on": devices},
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
    read_back_name = ("qaas' bitsandbytes reader (4-bit codes and absmax, nested statistics, or int8 rows and SCB, "
                      "dequantized as bitsandbytes does)")

    def read_back_weight(self, ctx: EngineContext, reader: Any, module: str) -> torch.Tensor | None:
        """The weight `[out, in]` of a converted `module` as the exported files hold it, else None."""
        if module not in set(ctx.state.get("quantized_modules") or []):
            return None
        return read_weight(reader, module)

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
