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
from .checkpoint import CheckpointReader, ShardedWriter
from .errors import InvalidConfig
from .evaluate import default_eval_text, default_seqlen, load_eval_data, load_original_model, perplexity
from .export import StagedOutput, carry_over_files, list_files, write_config, write_json
from .methods.base import EngineContext, check_config_model, check_config_sources, get_method
from .options import EngineOptions
from .progress import NullReporter, Reporter
from .source import resolve_source
from .version import package_version


class _StageClock:
    """Forwards to the caller's reporter and times every stage, whoever announces it."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
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

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.inner.progress(done, total, message=message, metrics=metrics)

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.inner.log(message, level=level, data=data)

    def check_cancelled(self) -> None:
        self.inner.check_cancelled()


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
    eval_skipped: str | None = None
    if options.evaluate and not options.eval_text_path:
        # No operator text: WikiText-2 test through `datasets`, as GPTQ papers evaluate; when that is not
        # reachable the job still delivers its model, and says why it has no perplexity.
        options.eval_text_path, eval_skipped = default_eval_text(options.cache_dir)
    if options.evaluate and options.eval_text_path:
        if not Path(options.eval_text_path).is_file():
            raise InvalidConfig(f"evaluation text {options.eval_text_path} does not exist", field="eval_text_path")
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
        if options.evaluate and options.eval_text_path and hasattr(method, "evaluate_outputs"):
            evaluation = method.evaluate_outputs(ctx, staged.path, options.eval_text_path, clock)
        elif options.evaluate and options.eval_text_path:
            evaluation = _evaluate(ctx, method, staged.path, clock, config)
        elif options.evaluate:
            evaluation = {"skipped": eval_skipped}
            clock.log(f"evaluation skipped: {eval_skipped}", level="warning")

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


def _evaluate(ctx: EngineContext, method: Any, staged_dir: Path, clock: _StageClock,
              config: dict[str, Any]) -> dict[str, Any]:
    options = ctx.options
    seqlen = default_seqlen(config, options.eval_seqlen)
    data = load_eval_data(
        ctx.source_dir, options.eval_text_path, seqlen=seqlen, max_windows=options.eval_max_windows,
        allow_remote_code=options.allow_remote_code,
    )
    clock.stage("evaluate", total=2 * data.windows, message=f"{data.windows} windows of {seqlen} tokens")
    model = load_original_model(ctx.source_dir, device=ctx.device, allow_remote_code=options.allow_remote_code,
                                use_safetensors=None if options.allow_pickle else True)
    before = perplexity(model, data, device=ctx.device, reporter=_Offset(clock, 0, 2 * data.windows), label="original")
    del model
    _free(ctx.device)
    model, how = method.load_for_evaluation(ctx, staged_dir)
    after = perplexity(model, data, device=ctx.device, reporter=_Offset(clock, data.windows, 2 * data.windows),
                       label="quantized")
    del model
    _free(ctx.device)
    clock.log(f"perplexity {before:.4f} -> {after:.4f}", data={"before": before, "after": after})
    return {"perplexity_before": before, "perplexity_after": after, "quantized_loaded_with": how, **data.describe()}


class _Offset:
    """Maps each perplexity pass's progress onto the evaluate stage's count (before, then after)."""

    def __init__(self, inner: _StageClock, offset: int, total: int) -> None:
        self.inner, self.offset, self.total = inner, offset, total

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.inner.progress(done + self.offset, self.total, message=message, metrics=metrics)

    def check_cancelled(self) -> None:
        self.inner.check_cancelled()

    def log(self, *a: Any, **k: Any) -> None:
        self.inner.log(*a, **k)

    def stage(self, *a: Any, **k: Any) -> None:
        self.inner.stage(*a, **k)
