"""The interface every quantization method implements, and the context the pipeline hands it.

The pipeline owns everything around the method: resolving the source, the checkpoint reader, the staged
output directory and its sharded writer, config.json, tokenizer files, evaluation and the result dict.
A method owns one thing: turning the source tensors into quantized tensors, written through
`ctx.writer`, one decoder block at a time, and saying what config it produced.

Adding a method: create the package `methods/<name>/` holding everything that is only this method's:
  * `method.py`: a class implementing `QuantizationMethod` (validate, stages, quantize, load_for_evaluation),
    with `quantize` reading as the method's steps in order; its request rules go in
    `qaas/quantization_rules/<quant_method>.py` (shared with the API) and `validate` applies them;
  * the algorithm, the planning of which layers are converted, and `format.py`: the checkpoint layout the
    method writes and the reader that loads it back (for evaluation and the interoperability tests);
  * `__init__.py`: what the method does, in words, and `from .method import <Class>`;
then add one line to `METHODS` below. What several methods need lives beside `methods/` in the engine and
is imported from there, never from another method's package: the source and checkpoint streaming
(`source`, `checkpoint`, `architecture`), calibration text and token windows (`calibration_data`),
block-by-block forward passes on calibration data (`blockwise`), evaluation, export, progress and options.
Methods are imported lazily, so a method whose module or dependencies are missing only fails the jobs that
ask for it, with InvalidConfig.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from qaas import quantization_rules
from qaas.quantization_rules import CalibrationSources, InvalidQuantizationConfig

from ..errors import InvalidConfig

if TYPE_CHECKING:
    import torch

    from ..architecture import ModelLayout
    from ..checkpoint import CheckpointReader, ShardedWriter
    from ..options import EngineOptions
    from ..progress import Reporter
    from ..source import ResolvedSource

def validated_config(quantization_config: dict[str, Any]) -> dict[str, Any]:
    """The config normalized by the one set of rules the API applies too (`qaas.quantization_rules`), or
    InvalidConfig naming the first broken rule's field."""
    try:
        return quantization_rules.normalize(quantization_config)
    except InvalidQuantizationConfig as exc:
        raise InvalidConfig(f"{exc.field}: {exc.message}", field=exc.field) from None


def check_config_sources(fields: dict[str, Any], sources: CalibrationSources) -> None:
    """InvalidConfig unless what the normalized config reads (calibration data) can be had with `sources`."""
    try:
        quantization_rules.check_sources(fields, sources)
    except InvalidQuantizationConfig as exc:
        raise InvalidConfig(f"{exc.field}: {exc.message}", field=exc.field) from None


def check_config_model(fields: dict[str, Any], model_config: dict[str, Any]) -> None:
    """InvalidConfig unless the method can take the model whose config.json is `model_config` (e.g. AWQ's
    scaling maps), asked as soon as config.json is read, before any weight or calibration text."""
    try:
        quantization_rules.check_model(fields, model_config)
    except InvalidQuantizationConfig as exc:
        raise InvalidConfig(f"{exc.field}: {exc.message}", field=exc.field) from None


#: quant_method -> "module:Class", imported on first use.
METHODS: dict[str, str] = {
    "awq": "qaas.worker.engine.methods.awq:AWQMethod",
    "bitsandbytes": "qaas.worker.engine.methods.bitsandbytes:BitsAndBytesMethod",
    "compressed-tensors": "qaas.worker.engine.methods.compressed_tensors:CompressedTensorsMethod",
    "gguf": "qaas.worker.engine.methods.gguf:GGUFMethod",
    "gptq": "qaas.worker.engine.methods.gptq:GPTQMethod",
}


@dataclass
class EngineContext:
    """Everything a method needs for one job. Built by the pipeline after the `load` stage."""

    #: Where the source came from (Hub id + commit sha, or local path).
    source: "ResolvedSource"
    #: Local directory of the source checkpoint (config.json, weights, tokenizer).
    source_dir: Path
    #: The source's config.json as a dict (the method must not mutate it).
    config: dict[str, Any]
    #: The validated, normalized quantization_config returned by `method.validate`.
    quantization_config: dict[str, Any]
    #: Streaming reader of the source weights: `reader.load_prefix(block.prefix)` loads one block.
    reader: "CheckpointReader"
    #: Sharded writer into the staging output directory: `writer.add(name, tensor)`.
    writer: "ShardedWriter"
    #: Blocks, Linear layers, pre/post tensors, default skips, meta model.
    layout: "ModelLayout"
    #: Torch device for the heavy work ("cpu" or "cuda:N"); tensors given to the writer may live anywhere.
    device: "torch.device"
    reporter: "Reporter"
    options: "EngineOptions"
    #: The staging output directory (renamed into place only when the job succeeds). Methods may write
    #: extra files here (e.g. quantize_config.json); the pipeline writes config.json and tokenizer files.
    work_dir: Path
    #: Free-form per-job state a method wants to keep between `quantize` and `load_for_evaluation`.
    #: "calibration_windows" (`[samples, seqlen]` token ids): set by a method that calibrates, so that
    #: evaluation leaves out the windows sharing text with them.
    state: dict[str, Any] = field(default_factory=dict)
    #: The evaluation run beside the quantization (`beside_eval.EvaluationBeside`), for a method that
    #: `evaluates_beside` when the job evaluates streamed and not from the exported files read back; else None.
    evaluation_beside: Any = None


@dataclass
class MethodResult:
    """What a method reports back to the pipeline after `quantize`."""

    #: The dict written as config.json["quantization_config"] (and returned in the job result).
    quantization_config: dict[str, Any]
    #: Module names of Linear layers that were left in floating point (head, incompatible shapes, ...).
    skipped_modules: list[str] = field(default_factory=list)
    #: Module names of Linear layers that were quantized.
    quantized_modules: list[str] = field(default_factory=list)
    #: Per-layer relative Frobenius error ||W - Q(W)||_F / ||W||_F, keyed by module name.
    layer_errors: dict[str, float] = field(default_factory=dict)
    #: Top-level config.json keys to set besides quantization_config (e.g. {"torch_dtype": "float16"}).
    config_updates: dict[str, Any] = field(default_factory=dict)
    #: Extra JSON files to write into the output, e.g. {"quantize_config.json": {...}} for GPTQ.
    extra_json_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Method-specific facts for the job result, under the method's name (GGUF: each output file; GPTQ: the
    #: checkpoint format written and the engines that load it; bitsandbytes: the devices it runs on).
    details: dict[str, Any] = field(default_factory=dict)
    #: Human-readable notes for the job result (why a layer was skipped, ...); log them through
    #: ctx.reporter as well, the pipeline does not.
    notes: list[str] = field(default_factory=list)
    #: What calibrated the model (`CalibrationSet.describe()`), for a method whose written config has no
    #: place for it (GPTQ keeps it in quantization_config.meta.calibration).
    calibration: dict[str, Any] | None = None


@runtime_checkable
class QuantizationMethod(Protocol):
    """One quantization method. Instances are created per job with no arguments."""

    #: The `quant_method` value it handles ("bitsandbytes", "gptq").
    name: ClassVar[str]

    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        """Check every field up front; return the normalized config (defaults filled in).

        Raise InvalidConfig(message, field=<field name>) for anything wrong. Called before any download.
        The rules themselves live in `qaas.quantization_rules.<quant_method>` (`validated_config` applies
        them), shared with the API; a method adds here only what needs the ML stack to decide."""

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        """The method's own stages, reported between `load` and `evaluate`: ["quantize"] or
        ["calibrate", "quantize"]. The pipeline reports `stage(name)` for the first; a method with several
        calls `ctx.reporter.stage(...)` itself for the later ones."""

    def quantize(self, ctx: EngineContext) -> MethodResult:
        """Read `ctx.reader` block by block, write every output tensor (quantized or copied) through
        `ctx.writer`, report `ctx.reporter.progress(i, n, metrics={...})` per block and call
        `ctx.reporter.check_cancelled()` between blocks. Must not close the writer."""

    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple["torch.nn.Module", str]:
        """Load the quantized model written in `out_dir` (complete: weights + config.json) for perplexity.

        Returns (model in eval mode on a device, how it was loaded: e.g. "transformers+bitsandbytes" or
        "dequantized weights in the original architecture").

        The whole-model path (`EngineOptions(eval_streamed=False)`). The pipeline evaluates block by block when
        the method also has `read_back_weight(ctx, reader, module) -> Tensor [out, in] | None`: the weight of one
        layer dequantized by the method's format reader from the exported files (`reader` reads `out_dir`),
        None for a layer it did not quantize; `read_back_name` says in words which reader that is. A method that
        holds each block once (GPTQ) may set `evaluates_beside = True`: it then runs `ctx.evaluation_beside`'s
        windows through each block while it holds it (`beside_eval`), and the exported files are read back only
        with `EngineOptions(eval_read_back=True)`."""


class CalibratedBlockRun(Protocol):
    """One job of a method that calibrates and then quantizes block by block (GPTQ, AWQ)."""

    def calibrate(self) -> Any: ...
    def capture_first_block_inputs(self, calib: Any) -> Any: ...
    def quantize_blocks(self, inputs: Any) -> None: ...
    def write_tensors_after_blocks(self) -> None: ...
    def result(self, calib: Any) -> MethodResult: ...


def run_calibrated_blocks(ctx: EngineContext, run: CalibratedBlockRun) -> MethodResult:
    """The order every calibrated block-streamed method runs in: calibration windows, the first block's inputs,
    the blocks one at a time, the tensors after the blocks, the result."""
    calib = run.calibrate()
    ctx.state["calibration_windows"] = calib.input_ids  # evaluation leaves out windows sharing text with them
    inputs = run.capture_first_block_inputs(calib)
    run.quantize_blocks(inputs)
    del inputs  # the captured activations are freed before the tensors after the blocks are written
    run.write_tensors_after_blocks()
    return run.result(calib)


def get_method(quant_method: Any) -> QuantizationMethod:
    """The method for `quantization_config["quant_method"]`, or InvalidConfig."""
    if not isinstance(quant_method, str) or quant_method not in METHODS:
        raise InvalidConfig(
            f"quant_method must be one of {', '.join(sorted(METHODS))}, not {quant_method!r}", field="quant_method"
        )
    module_name, _, cls_name = METHODS[quant_method].partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidConfig(
            f"quant_method {quant_method!r} is not available in this engine ({type(exc).__name__}: {exc})",
            field="quant_method",
        ) from None
    return cls()
