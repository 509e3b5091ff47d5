"""The `quant_method: "gptq"` method: the request, the stages, evaluation (the package docstring says how)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, validated_config
from .format import load_saved_weights
from .run import GPTQRun


class GPTQMethod:
    name: ClassVar[str] = "gptq"

    # -- request ---------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return validated_config(quantization_config)

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
