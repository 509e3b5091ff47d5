"""The `quant_method: "gptq"` method: the request, the stages, evaluation (the package docstring says how)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from qaas.quantization_rules.gptq import written_format

from ...evaluate import load_with_replaced_weights
from ...ranks import Ranks, job_ranks
from ..base import EngineContext, MethodResult, run_calibrated_blocks, validated_config
from .format import LAYER_TENSORS, dequantize_layer, load_saved_weights
from .run import GPTQRun


class GPTQMethod:
    name: ClassVar[str] = "gptq"

    # -- request ---------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return validated_config(quantization_config)

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"]

    def quantize(self, ctx: EngineContext) -> MethodResult:
        with job_ranks(ctx) as ranks:  # one process, or one per GPU of `options.gpus`
            return run_calibrated_blocks(ctx, GPTQRun(ctx, ranks))

    def quantize_blocks_as_rank(self, ctx: EngineContext, ranks: Ranks) -> None:
        """Ranks 1..N-1 of a several-GPU job: the same steps beside rank 0, which reports and writes."""
        run_calibrated_blocks(ctx, GPTQRun(ctx, ranks))

    # -- evaluation ----------------------------------------------------------------------------------------
    #: The evaluation windows ride the block loop (`beside_eval`); the exported files are read back
    #: (`read_back_weight`) only with `EngineOptions(eval_read_back=True)`.
    evaluates_beside = True
    read_back_name = "qaas' GPTQ reader (qweight, qzeros, scales, g_idx unpacked as GPTQ v1/v2 loaders do)"

    def read_back_weight(self, ctx: EngineContext, reader: Any, module: str) -> torch.Tensor | None:
        """The weight `[out, in]` of `module` as the exported files hold it, or None when it is not quantized
        (the streamed evaluation then reads its stored float tensor)."""
        if f"{module}.qweight" not in reader:
            return None
        info = ctx.state.get("gptq") or {}
        bits = info.get("bits", ctx.quantization_config["bits"])
        fmt = info.get("format") or written_format(ctx.quantization_config)[0]
        return dequantize_layer({s: reader.load(f"{module}.{s}") for s in LAYER_TENSORS}, bits, fmt=fmt)

    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """The saved checkpoint dequantized into the original architecture (GPTQ kernels need optimum or
        GPTQModel, which the engine does not depend on)."""
        info = ctx.state.get("gptq") or {}
        bits = info.get("bits", ctx.quantization_config["bits"])
        fmt = info.get("format") or written_format(ctx.quantization_config)[0]

        def replace(model: torch.nn.Module) -> None:
            load_saved_weights(model, out_dir, bits=bits, fmt=fmt)

        model = load_with_replaced_weights(ctx.source_dir, replace, device=ctx.device,
                                           allow_remote_code=ctx.options.allow_remote_code)
        return model, "dequantized GPTQ weights in the original architecture"
