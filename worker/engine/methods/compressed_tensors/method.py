"""The `quant_method: "compressed-tensors"` method: the request, the stages, evaluation (the package docstring
says what is written and why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from qaas.quantization_rules.compressed_tensors import needs_calibration

from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, validated_config
from .format import attach_activation_quantization, load_saved_weights
from .run import quantize_model
from .schemes import scheme_for


class CompressedTensorsMethod:
    name: ClassVar[str] = "compressed-tensors"

    # -- request -------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return validated_config(quantization_config)

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"] if needs_calibration(quantization_config) else ["quantize"]

    def quantize(self, ctx: EngineContext) -> MethodResult:
        return quantize_model(ctx)

    # -- evaluation ----------------------------------------------------------------------------------
    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """transformers with compressed-tensors (what users load it with) when importable and working here;
        else the original architecture with our dequantized weights and the scheme's activation quantization."""
        reason = ""
        try:
            import compressed_tensors  # noqa: F401
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(out_dir), device_map={"": str(ctx.device)}, trust_remote_code=ctx.options.allow_remote_code
            ).eval()
            with torch.no_grad():  # the first forward decompresses; it must run on this device
                model(torch.tensor([[1, 2]], device=ctx.device), use_cache=False)
            return model, "transformers+compressed-tensors"
        except ImportError as exc:
            reason = f"compressed-tensors not importable ({exc})"
        except Exception as exc:  # measure the same weights another way
            reason = f"transformers+compressed-tensors failed on {ctx.device} ({type(exc).__name__}: {exc})"
        ctx.reporter.log(f"evaluating dequantized weights: {reason}", level="warning")
        scheme = scheme_for(ctx.quantization_config)
        quantized = ctx.state.get("quantized_modules") or []
        scales: dict[str, torch.Tensor] = {}

        def replace(model: torch.nn.Module) -> None:
            scales.update(load_saved_weights(model, out_dir, scheme))

        model = load_with_replaced_weights(ctx.source_dir, replace, device=ctx.device,
                                           allow_remote_code=ctx.options.allow_remote_code)
        attach_activation_quantization(model, quantized, scheme, scales)
        return model, "dequantized weights with the scheme's activation quantization, in the original architecture"
