"""One quantization job, end to end: resolve -> load -> [calibrate] -> quantize -> evaluate -> export.

`quantize()` is the engine's single entry point. It validates the request before touching the source,
streams the weights one decoder block at a time through the chosen method into a staging directory, measures
perplexity before/after (optional), and renames the staging directory into place only when everything
succeeded, so `out_dir` either holds a complete model or does not exist.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from .architecture import inspect_model, load_hf_config
from .beside_eval import EvaluationBeside
from .checkpoint import CheckpointReader, ShardedWriter
from .errors import InvalidConfig
from .evaluate import choose_text, default_seqlen, load_eval_data, load_original_model, perplexity
from .export import StagedOutput, carry_over_files, list_files, write_config, write_json
from .methods.base import EngineContext, check_config_model, check_config_sources, get_method
from .options import EngineOptions
from .progress import ForwardingReporter, NullReporter, Reporter
from .source import resolve_source
from .streamed_eval import StreamedEvaluator, eval_dtype
from .version import package_version


class _StageClock(ForwardingReporter):
    """Forwards to the caller's reporter and times every stage, whoever announces it."""

    def __init__(self, inner: Reporter) -> None:
        super().__init__(inner)
        self.current: str | None = None
        self._t0 = 0.0
        self.timings: dict[str, float] = {}

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self._close()
        self.inner.check_cancelled()
        self.current, self._t0 = name, time.monotonic()
        self.inner.stage(name, total=total, message=message)

    def _close(self) -> None:
        if self.current is not None:
            self.timings[self.current] = round(self.timings.get(self.current, 0.0) + time.monotonic() - self._t0, 3)
            self.current = None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _weight_bytes(directory: Path, names: list[str]) -> int:
    return sum((directory / n).stat().st_size for n in names)


def quantize(
    source: dict[str, Any],
    quantization_config: dict[str, Any],
    out_dir: str | Path,
    *,
    options: EngineOptions,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Quantize `source` ({"path": dir} or {"id": repo, "revision": rev}) into `out_dir`; return the result.

    Raises an EngineError subclass for anything the user can fix, JobCancelled when
    `reporter.check_cancelled()` says so; `out_dir` is created only on success.
    """
    clock = _StageClock(reporter or NullReporter())
    if not isinstance(source, dict):
        raise InvalidConfig("source must be an object with 'path' or 'id'", field="source")
    if not isinstance(quantization_config, dict):
        raise InvalidConfig("quantization_config must be an object", field="quantization_config")
    request = dict(quantization_config)
    method = get_method(request.get("quant_method"))
    fields = method.validate(request)
    check_config_sources(fields, options.calibration_sources())
    method_stages = method.stages(fields)
    device = torch.device(options.resolved_device())
    if device.type == "cuda":
        # The job's GPU peak (reported in the result; the worker exports it as a metric). The allocator's
        # statistics exist only once CUDA is initialised, and want an index (bare "cuda" = current device).
        torch.cuda.init()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
    eval_text = None
    if options.evaluate:
        # Decided before any work: a text that cannot be read (or is the calibration data itself) fails now.
        if options.eval_text is None and options.eval_text_path and not Path(options.eval_text_path).is_file():
            raise InvalidConfig(f"evaluation text {options.eval_text_path} does not exist", field="eval_text_path")
        _check_eval_text(options, fields)
        eval_text = choose_text(options.eval_text, options.eval_text_path, options.calibration_sources())
    block_name = request.get("block_name_to_quantize")

    staged = StagedOutput(out_dir)
    reader = None
    writer = None
    try:
        clock.stage("resolve", message=str(source.get("id") or source.get("path") or ""))
        resolved = resolve_source(source, options)
        clock.log("source resolved", data=resolved.describe())

        clock.stage("load")
        config = json.loads((resolved.path / "config.json").read_text(encoding="utf-8"))
        check_config_model(fields, config)
        hf_config = load_hf_config(resolved.path, allow_remote_code=options.allow_remote_code)
        reader = CheckpointReader(resolved.path, allow_pickle=options.allow_pickle)
        layout = inspect_model(
            resolved.path, reader, block_name_to_quantize=block_name,
            allow_remote_code=options.allow_remote_code, hf_config=hf_config,
        )
        clock.log(
            f"{layout.architecture}: {layout.num_blocks} blocks under {layout.block_name}, "
            f"{len(layout.all_linears())} linear layers",
            data={"block_name": layout.block_name, "num_blocks": layout.num_blocks,
                  "tied_embeddings": layout.tied_embeddings},
        )
        writer = ShardedWriter(staged.path, max_shard_size=options.max_shard_size_bytes)
        ctx = EngineContext(
            source=resolved, source_dir=resolved.path, config=config, quantization_config=fields,
            reader=reader, writer=writer, layout=layout, device=device, reporter=clock,
            options=options, work_dir=staged.path,
        )
        if (eval_text is not None and options.eval_streamed and not options.eval_read_back
                and getattr(method, "evaluates_beside", False)):
            # the evaluation windows ride the method's own block stream (`beside_eval`); the data is read once
            # the calibration windows are known (the method calls `begin` then)
            ctx.evaluation_beside = EvaluationBeside(
                layout, reader, device, lambda: _eval_data(ctx, clock, config, eval_text),
                allow_remote_code=options.allow_remote_code)

        # quantize counts blocks; an earlier method stage (GPTQ's calibrate) reports a count of its own
        clock.stage(method_stages[0], total=layout.num_blocks if method_stages[0] == "quantize" else None)
        result = method.quantize(ctx)
        ctx.state["quantized_modules"] = result.quantized_modules
        # a method with its own file format (GGUF) writes its files itself: no checkpoint, config or tokenizer
        own_format = getattr(method, "output_format", "safetensors") != "safetensors"
        if own_format:
            weight_files = [p.name for p in sorted(staged.path.iterdir())]
            written_config = {"quantization_config": result.quantization_config}
            carried = []
        else:
            weight_files = [f.name for f in writer.close()]
            written_config = write_config(staged.path, config, result.quantization_config, result.config_updates)
            for name, data in result.extra_json_files.items():
                write_json(staged.path / name, data)
            carried = carry_over_files(resolved.path, staged.path)
        clock.check_cancelled()

        evaluation = None
        beside = ctx.evaluation_beside
        if beside is not None and beside.began:
            if beside.skipped is None:
                clock.stage("evaluate", total=2, message=f"{beside.data.windows} windows of {beside.data.seqlen} "
                                                         "tokens, beside the quantization's blocks")
            evaluation = beside.finish(clock)
        elif eval_text is not None and hasattr(method, "evaluate_outputs"):
            # a method whose outputs another runtime evaluates (GGUF through llama.cpp); `load_eval_data` takes
            # the chosen text where it takes a path
            evaluation = method.evaluate_outputs(ctx, staged.path, eval_text, clock)
        elif eval_text is not None:
            evaluation = _evaluate(ctx, method, staged.path, clock, config, eval_text)

        clock.stage("export")
        files = list_files(staged.path)
        size_before = _weight_bytes(resolved.path, reader.files)
        size_after = _weight_bytes(staged.path, [f for f in weight_files if f.endswith((".safetensors", ".gguf"))])
        clock.check_cancelled()
        staged.commit()
        clock._close()
    except BaseException:
        if writer is not None:
            writer.abandon()  # its background shard write finishes before the staging folder goes
        staged.abort()
        raise
    finally:
        if reader is not None:
            reader.close()

    errs = result.layer_errors
    return {
        "engine_version": f"qaas {package_version()}",
        "method": method.name,
        "out_dir": str(staged.final_dir),
        "files": files,
        "source": resolved.describe(),
        "size_before_bytes": size_before,
        "size_after_bytes": size_after,
        "compression_ratio": round(size_before / size_after, 4) if size_after else None,
        "quantization_config": written_config["quantization_config"],
        "skipped_modules": result.skipped_modules,
        # what calibrated the model (GPTQ): sample count, tokens, sha256 of the text
        "calibration": result.calibration or (written_config["quantization_config"].get("meta") or {}).get("calibration"),
        "quantized_modules": len(result.quantized_modules),
        "layer_errors": {
            "mean": (sum(errs.values()) / len(errs)) if errs else None,
            "max": max(errs.values()) if errs else None,
            "per_layer": errs,
        },
        "evaluation": evaluation,
        "architecture": {
            "class": layout.architecture, "model_type": layout.model_type, "block_name": layout.block_name,
            "num_blocks": layout.num_blocks, "tied_embeddings": layout.tied_embeddings,
        },
        "carried_over_files": carried,
        "notes": result.notes,
        **({method.name: result.details} if result.details else {}),
        "timings": dict(clock.timings),
        "device": str(device),
        "gpu_peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _check_eval_text(options: EngineOptions, fields: dict[str, Any]) -> None:
    from qaas import eval_text as rules
    from qaas.quantization_rules import FieldError

    if options.eval_text is None:
        return
    try:
        rules.check_value(options.eval_text, "eval_text")
        rules.check_can_be_had(options.eval_text, options.calibration_sources(), "eval_text")
        rules.check_not_calibration(options.eval_text, fields.get("dataset"), options.allowed_roots, "eval_text")
    except FieldError as exc:
        raise InvalidConfig(f"eval_text: {exc.message}", field="eval_text") from None


def _eval_data(ctx: EngineContext, clock: _StageClock, config: dict[str, Any], text: Any) -> Any:
    """The evaluation windows (`EvalData`), leaving out those that share text with the calibration windows; or,
    when the text is left with no window (all of it in the calibration set), the result that says why."""
    options = ctx.options
    seqlen = default_seqlen(config, options.eval_seqlen)
    try:
        data = load_eval_data(
            ctx.source_dir, seqlen=seqlen, max_windows=options.eval_max_windows, text=text,
            allow_remote_code=options.allow_remote_code, calibration_windows=ctx.state.get("calibration_windows"),
        )
    except InvalidConfig as exc:  # the model is delivered all the same; the result says why it has no perplexity
        clock.log(f"evaluation skipped: {exc.message} ({text.source})", level="warning")
        return {"skipped": f"{exc.message} ({text.source}); name another text with options.eval_text",
                "text": text.describe()}
    if data.left_out:
        clock.log(f"evaluation: {data.left_out} windows of {text.source} left out, they share text with the "
                  f"calibration data; {data.windows} evaluated", level="warning",
                  data={"windows_left_out": data.left_out})
    return data


def _evaluate(ctx: EngineContext, method: Any, staged_dir: Path, clock: _StageClock,
              config: dict[str, Any], text: Any) -> dict[str, Any]:
    """Perplexity before/after on the same windows, after the quantization; block by block unless the options or
    the method say otherwise. A text left with no window skips evaluation, saying why."""
    options = ctx.options
    data = _eval_data(ctx, clock, config, text)
    if isinstance(data, dict):
        return data
    seqlen = data.seqlen
    read_back = getattr(method, "read_back_weight", None)
    if options.eval_streamed and read_back is not None:
        return _evaluate_streamed(ctx, method, staged_dir, clock, data)
    clock.stage("evaluate", total=2 * data.windows, message=f"{data.windows} windows of {seqlen} tokens")
    t0 = time.monotonic()
    model = load_original_model(ctx.source_dir, device=ctx.device, allow_remote_code=options.allow_remote_code,
                                use_safetensors=None if options.allow_pickle else True)
    before = perplexity(model, data, device=ctx.device, reporter=_Offset(clock, 0, 2 * data.windows), label="original")
    del model
    _free(ctx.device)
    t1 = time.monotonic()
    model, how = method.load_for_evaluation(ctx, staged_dir)
    after = perplexity(model, data, device=ctx.device, reporter=_Offset(clock, data.windows, 2 * data.windows),
                       label="quantized")
    del model
    _free(ctx.device)
    clock.log(f"perplexity {before:.4f} -> {after:.4f}", data={"before": before, "after": after})
    return {"perplexity_before": before, "perplexity_after": after, "quantized_loaded_with": how,
            "mode": "whole model", "measured": {"original": "the source checkpoint, whole model, stored dtype",
                                                "quantized": how},
            "seconds": {"original": round(t1 - t0, 3), "quantized": round(time.monotonic() - t1, 3),
                        "total": round(time.monotonic() - t0, 3)},
            **data.describe()}


def _evaluate_streamed(ctx: EngineContext, method: Any, staged_dir: Path, clock: _StageClock,
                       data: Any) -> dict[str, Any]:
    """Both passes block by block (`streamed_eval`), after the quantization: the original from the source
    checkpoint, the quantized model from the exported files as written, every quantized layer dequantized by
    the method's format reader (`read_back_weight`) and every other tensor as stored. (A method that evaluates
    beside its quantization comes here only with `EngineOptions(eval_read_back=True)`.)"""
    layout, device = ctx.layout, ctx.device
    dtype = eval_dtype(ctx.config, device)
    ev = StreamedEvaluator(layout, data, device=device, dtype=dtype, allow_remote_code=ctx.options.allow_remote_code)
    total = 2 * ev.steps
    clock.stage("evaluate", total=total, message=f"{data.windows} windows of {data.seqlen} tokens, block by block")
    before = ev.run(ctx.reader.load_many, reporter=clock, total_steps=total, label="original")
    _free(device)
    out_reader = CheckpointReader(staged_dir)
    on_device = _ReaderOnDevice(out_reader, device)
    linears = {li.weight_name: li for li in layout.all_linears()}

    def load_exported(names: list[str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            li = linears.get(name)
            w = method.read_back_weight(ctx, on_device, li.name) if li is not None else None
            if w is not None:
                tensors[name] = w.t() if li.transposed else w
            elif name in out_reader:
                tensors[name] = out_reader.load(name)
        return tensors

    try:
        after = ev.run(load_exported, reporter=clock, step_offset=ev.steps, total_steps=total, label="quantized")
    finally:
        out_reader.close()
    _free(device)
    reader_name = getattr(method, "read_back_name", f"qaas' {method.name} format reader")
    where = f"{str(dtype).removeprefix('torch.')} on {device.type}"
    clock.log(f"perplexity {before.perplexity:.4f} -> {after.perplexity:.4f} ({before.seconds + after.seconds:.1f} s)",
              data={"before": before.perplexity, "after": after.perplexity})
    return {
        "perplexity_before": before.perplexity,
        "perplexity_after": after.perplexity,
        "quantized_loaded_with": f"the exported files, read back by {reader_name}",
        "mode": "streamed block by block",
        "measured": {
            "original": f"the source checkpoint's tensors in the original architecture, {where}",
            "quantized": (f"the exported checkpoint as written: every quantized layer dequantized from its stored "
                          f"tensors by {reader_name}, every other tensor as stored, in the original architecture, "
                          f"{where}"),
        },
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": {"original": round(before.seconds, 3), "quantized": round(after.seconds, 3),
                    "total": round(before.seconds + after.seconds, 3)},
        **data.describe(),
    }


class _ReaderOnDevice:
    """The exported files' reader, handing each tensor over on the evaluation device: the method's reader
    unpacks and dequantizes there (its kernels), not on the host."""

    def __init__(self, reader: CheckpointReader, device: torch.device) -> None:
        self.reader, self.device = reader, device

    def load(self, name: str) -> torch.Tensor:
        return self.reader.load(name).to(self.device)

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def __getattr__(self, name: str) -> Any:  # names(), names_with_prefix(), ...
        return getattr(self.reader, name)


class _Offset(ForwardingReporter):
    """Maps each perplexity pass's progress onto the evaluate stage's count (before, then after)."""

    def __init__(self, inner: _StageClock, offset: int, total: int) -> None:
        super().__init__(inner)
        self.offset, self.total = offset, total

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.inner.progress(done + self.offset, self.total, message=message, metrics=metrics)
