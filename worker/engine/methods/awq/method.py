"""The `quant_method: "awq"` method: the request, the stages, evaluation (the package docstring says how)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from ...evaluate import load_with_replaced_weights
from ..base import EngineContext, MethodResult, run_calibrated_blocks, validated_config
from .format import LAYER_TENSORS, dequantize_layer, load_saved_weights
from .run import AWQRun


class AWQMethod:
    name: ClassVar[str] = "awq"

    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return validated_config(quantization_config)

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"]

    def quantize(self, ctx: EngineContext) -> MethodResult:
        return run_calibrated_blocks(ctx, AWQRun(ctx))

    read_back_name = "qaas' AWQ reader (GEMM-packed qweight, qzeros, scales unpacked in AWQ's order)"

    def read_back_weight(self, ctx: EngineContext, reader: Any, module: str) -> torch.Tensor | None:
        """The weight `[out, in]` of `module` as the exported files hold it (the scaled norms before it are read
        from the files as stored), or None when it is not quantized."""
        if f"{module}.qweight" not in reader:
            return None
        gs = (ctx.state.get("awq") or {}).get("group_size", ctx.quantization_config["group_size"])
        return dequantize_layer({s: reader.load(f"{module}.{s}") for s in LAYER_TENSORS}, gs)

    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """The saved checkpoint dequantized into the original architecture (AWQ kernels come with GPTQModel,
        which the engine does not depend on); the scaled norms and float layers are read from it as well."""
        gs = (ctx.state.get("awq") or {}).get("group_size", ctx.quantization_config["group_size"])

        def replace(model: torch.nn.Module) -> None:
            load_saved_weights(model, out_dir, group_size=gs)

        model = load_with_replaced_weights(ctx.source_dir, replace, device=ctx.device,
                                           allow_remote_code=ctx.options.allow_remote_code)
        return model, "dequantized AWQ weights in the original architecture"
