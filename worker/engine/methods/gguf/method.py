"""The `quant_method: "gguf"` method: one pass over the source, every requested type written as it goes,
then (when evaluation is on) each file's perplexity through llama.cpp itself."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from qaas import quantization_rules
from qaas.kernels.gguf import FLOAT_TYPES, quantize_tensor, round_float
from qaas.quantization_rules import InvalidQuantizationConfig
from qaas.quantization_rules.gguf import split_bytes

from ...errors import InvalidConfig
from ...evaluate import default_seqlen, load_eval_data, load_original_model, perplexity
from ..base import EngineContext, MethodResult, validated_config
from .convert import plan_tensors, source_values
from .format import GGUFOutput, WrittenGGUF
from .imatrix import ImportanceMatrix, calibration_windows, compute_imatrix
from .recipes import loader_order, tensor_types
from .vocab import read_vocab


def _rounded(values: torch.Tensor, float_type: str) -> torch.Tensor:
    """The values as the conversion's float file stores them (what llama-quantize would read back)."""
    if float_type == "F16":
        return values.to(torch.float16).to(torch.float32)
    if float_type == "BF16":
        return values.to(torch.bfloat16).to(torch.float32)
    return values


#: The importance matrix beside the models, in llama.cpp's format.
IMATRIX_FILE = "imatrix.gguf"


class GGUFMethod:
    name: ClassVar[str] = "gguf"
    #: The method writes its own files (GGUF), not a safetensors checkpoint with config.json.
    output_format: ClassVar[str] = "gguf"

    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        return validated_config(quantization_config)

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"] if quantization_config.get("imatrix") else ["quantize"]

    def quantize(self, ctx: EngineContext) -> MethodResult:
        fields, config, reporter = ctx.quantization_config, ctx.config, ctx.reporter
        try:
            quantization_rules.check_model(fields, config)
        except InvalidQuantizationConfig as exc:
            raise InvalidConfig(exc.message, field=exc.field) from None
        shapes = {info.name: tuple(info.shape) for info in ctx.reader.infos()}
        planned = {t.name: t for t in plan_tensors(config, shapes)}
        order = [planned[n] for n in loader_order(list(planned))]
        float_type = fields["output_type_default"]
        conv = [(t.name, t.shape, "F32" if t.keep_f32 else float_type) for t in order]
        imatrix = self._importance_matrix(ctx, order) if fields["imatrix"] else None
        vocab = read_vocab(ctx.source_dir, config)
        model_name = ctx.source.repo_id.split("/")[-1] if ctx.source.repo_id else None
        hparams = {"n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"],
                   "n_head_kv": config.get("num_key_value_heads") or config["num_attention_heads"]}
        # what `llama-quantize --imatrix imatrix.gguf` records in each file it quantizes with the matrix
        imatrix_keys = (imatrix.quantize_metadata(IMATRIX_FILE, ctx.state["imatrix_entries"])
                        if imatrix is not None else [])
        outputs = [GGUFOutput(ctx.work_dir, t, order, tensor_types(t, conv, hparams, has_imatrix=imatrix is not None),
                              config=config, vocab=vocab,
                              source_dir=ctx.source_dir, model_name=model_name,
                              split_bytes=split_bytes(fields["split_max_size"]), quantize_keys=imatrix_keys)
                   for t in fields["types"]]
        n_blocks, done_blocks = config["num_hidden_layers"], -1
        phases: dict[str, float] = {}  # seconds per phase (the device synchronized before each is closed)

        def lap(name: str, since: float) -> float:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - since
            return now
        try:
            for t in order:
                reporter.check_cancelled()
                block = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
                if block > done_blocks and block >= 0:
                    if done_blocks >= 0:
                        reporter.progress(done_blocks + 1, n_blocks, message=f"block {done_blocks + 1}/{n_blocks}")
                    done_blocks = block
                t0 = time.perf_counter()
                hf = ctx.reader.load(t.hf_name) if t.hf_name is not None else None
                t0 = lap("read", t0)
                values = source_values(t, hf, config).to(ctx.device)
                if not t.keep_f32:
                    values = _rounded(values, float_type)
                rows = values.reshape(-1, t.shape[-1])
                importance = imatrix.values(_module(t.hf_name)) if imatrix is not None and t.hf_name else None
                t0 = lap("convert", t0)
                for out in outputs:
                    ttype = out.types[t.name]
                    data = (round_float(rows, ttype) if ttype in FLOAT_TYPES
                            else quantize_tensor(rows, ttype, imatrix=importance))
                    t0 = lap(f"quantize {out.type_name}", t0)
                    out.wait_for_room()  # timed apart: a writer (disk) that falls behind shows as its own phase
                    t0 = lap(f"writer backlog {out.type_name}", t0)
                    out.write(data)
                    t0 = lap(f"to host + queue write {out.type_name}", t0)
                del hf, values, rows
            t0 = time.perf_counter()
            # the outputs finish side by side: their last writes, then each file's sha256
            written = [f.result() for f in [o.close_async() for o in outputs]]
            lap("finish writes + sha256", t0)
        except BaseException:  # cancelled or failed: no writer thread left writing into the discarded staging dir
            for out in outputs:
                out.abandon()
            raise
        reporter.progress(n_blocks, n_blocks, message=f"block {n_blocks}/{n_blocks}")
        described = [w.describe() for w in written]
        for d in described:
            reporter.log(f"model-{d['type']}.gguf: {d['size']} bytes, {d['bits_per_weight']} bits per weight",
                         data={"type": d["type"], "size": d["size"], "bits_per_weight": d["bits_per_weight"]})
        ctx.state["gguf_outputs"] = written
        written_sizes = sum(d["size"] for d in described)
        details: dict[str, Any] = {"outputs": described, "phases_s": {k: round(v, 3) for k, v in phases.items()},
                                   "bytes_written": written_sizes}
        if imatrix is not None:
            details["imatrix"] = {"file": IMATRIX_FILE, "entries": ctx.state["imatrix_entries"],
                                  "seconds": round(ctx.state["imatrix_seconds"], 3)}
        return MethodResult(quantization_config=dict(fields), details=details,
                            calibration=imatrix.calibration.describe() if imatrix is not None else None,
                            quantized_modules=sorted(n for n, t in written[0].tensor_types.items()
                                                     if t not in FLOAT_TYPES))

    def _importance_matrix(self, ctx: EngineContext, order: list[Any]) -> ImportanceMatrix:
        """The `calibrate` stage: llama.cpp's importance matrix from the job's calibration data, written as
        imatrix.gguf beside the models; then the `quantize` stage begins."""
        t0 = time.perf_counter()
        calib = calibration_windows(ctx)
        ctx.state["calibration_windows"] = calib.input_ids  # evaluation leaves out windows sharing text with them
        ctx.reporter.log(f"importance matrix: {calib.nsamples} windows x {calib.seqlen} tokens from {calib.source}",
                         data=calib.describe())
        for warning in calib.warnings:
            ctx.reporter.log(warning, level="warning")
        imatrix = compute_imatrix(ctx, calib)
        ctx.state["imatrix_entries"] = imatrix.write(
            ctx.work_dir / IMATRIX_FILE,
            {_module(t.hf_name): t.name for t in order if t.hf_name and t.hf_name.endswith(".weight")})
        ctx.state["imatrix_seconds"] = time.perf_counter() - t0
        ctx.reporter.stage("quantize", total=ctx.config["num_hidden_layers"])
        return imatrix

    # -- evaluation ----------------------------------------------------------------------------------------
    def evaluate_outputs(self, ctx: EngineContext, out_dir: Path, eval_text_path: str,
                         reporter: Any) -> dict[str, Any]:
        """Perplexity of the source model (transformers) and of every file (llama.cpp's logits) on the same
        token windows."""
        options = ctx.options
        seqlen = default_seqlen(ctx.config, options.eval_seqlen)
        data = load_eval_data(ctx.source_dir, eval_text_path, seqlen=seqlen, max_windows=options.eval_max_windows,
                              allow_remote_code=options.allow_remote_code)
        written: list[WrittenGGUF] = ctx.state["gguf_outputs"]
        total = data.windows * (1 + len(written))
        reporter.stage("evaluate", total=total, message=f"{data.windows} windows of {seqlen} tokens")
        model = load_original_model(ctx.source_dir, device=ctx.device, allow_remote_code=options.allow_remote_code,
                                    use_safetensors=True)
        before = perplexity(model, data, device=ctx.device, label="original")
        del model
        per_type: dict[str, Any] = {}
        try:
            import llama_cpp
        except ImportError as exc:
            reporter.log(f"GGUF perplexity skipped: llama-cpp-python is not importable ({exc})", level="warning")
            return {"perplexity_before": before, "per_type": None,
                    "skipped": "llama-cpp-python is not installed on this worker", **data.describe()}
        for k, w in enumerate(written):
            reporter.check_cancelled()
            ppl = gguf_perplexity(llama_cpp, out_dir / w.files[0].name, data.input_ids, seqlen)
            per_type[w.type] = {"perplexity": ppl, "delta": ppl - before}
            reporter.progress(data.windows * (k + 2), total, message=f"model-{w.type}.gguf perplexity {ppl:.4f}")
        return {"perplexity_before": before, "per_type": per_type, "quantized_loaded_with": "llama.cpp",
                **data.describe()}


def _module(hf_tensor: str) -> str:
    """"model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"."""
    return hf_tensor.rsplit(".", 1)[0]


def gguf_perplexity(llama_cpp: Any, path: Path, windows: torch.Tensor, seqlen: int) -> float:
    """exp(mean over windows of the mean next-token NLL), the logits computed by llama.cpp on the CPU."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, logits_all=True, verbose=False,
                          n_threads=max(1, min(8, (torch.get_num_threads()))))
    try:
        total = 0.0
        for ids in windows.tolist():
            llm.reset()
            llm.eval(ids)
            logits = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
            total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
        return float(math.exp(total / len(windows)))
    finally:
        llm.close()
