"""One GPTQ quantization of one model, as the steps `GPTQMethod.quantize` calls in order:

1. `calibrate`: the `dataset` becomes `nsamples` token windows of `model_seqlen` tokens, cut into batches;
2. `capture_first_block_inputs`: the model without its blocks runs the batches up to the first block;
   the tensors before the blocks are written;
3. `quantize_blocks`, the `quantize` stage: for each block (`quantize_block`), load it, plan its layers (first block only), and per sequential group
   accumulate the Hessians of the group's inputs, quantize each layer (`quantize_layer`: GPTQ, pack, write,
   put the quantized weight into the live block); then run the *quantized* block to produce the next
   block's inputs and write the block's unquantized tensors;
4. `write_tensors_after_blocks`, then `result`: the written quantization config, skipped layers, errors.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from qaas.quantization_rules import engines
from qaas.quantization_rules.fields import FieldError
from qaas.quantization_rules.gptq import DEFAULT_NSAMPLES, written_format

from ...architecture import BlockInfo, LinearInfo, build_meta_model
from ...blockwise import (BlockInputCapture, BlockRunner, compute_dtype, discover_input_groups,
                          forward_chunk_tokens, materialize_block)
from ...calibration_data import CalibrationSet, load_calibration
from ...errors import InvalidConfig, UnsupportedModel
from ...evaluate import default_seqlen, relative_error
from ...progress import PhaseTimer
from ...version import package_version
from ..base import EngineContext, MethodResult
from ...gptq_algorithm import HessianFactor, gptq_quantize, hessian_factor, output_error
from .format import build_quantization_config, pack_layer, stored_float
from ...hessian import HessianAccumulator
from .planning import activation_device, sequential_groups, skipped_layers, without


@dataclass
class BlockInputs:
    """The calibration inputs of the block about to be quantized, and what makes the next block's."""

    #: Hidden states per batch, and (other positional args, keyword args) per batch.
    hidden: list[torch.Tensor]
    rest: list[tuple[tuple, dict[str, Any]]]
    batches: list[torch.Tensor]
    #: Where the activations are kept (the device, or the CPU when they do not fit).
    store: torch.device
    #: With cache_block_outputs=false: the model before its blocks, and the quantized blocks so far, which
    #: recompute each block's inputs from the embeddings.
    capture: BlockInputCapture | None = None
    done_blocks: list[torch.nn.Module] = field(default_factory=list)


class GPTQRun:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.quantization_config
        self.layout = ctx.layout
        self.rep = ctx.reporter
        self.device = ctx.device
        self.dtype = compute_dtype(ctx.device, ctx.config)
        self.cache_outputs: bool = self.cfg["cache_block_outputs"]
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.clock = PhaseTimer(self.device, self.timings)
        self.quantized: list[str] = []
        self.errors: dict[str, float] = {}
        #: The plan, made on the first block: layers kept in float16 (block-relative names, why), and the
        #: sequential groups of input classes that are quantized.
        self.skipped: dict[str, str] = {}
        self.groups: list[list[list[str]]] | None = None
        self.t_start = 0.0
        #: The checkpoint format written (asymmetric configs are always gptq_v2) and why, when not the one asked.
        self.fmt, self.fmt_reason = written_format(self.cfg)
        try:  # the API checked this at submission; `qaas quantize` and library callers get the same answer
            engines.check_targets(self.cfg, ctx.options.targets)
        except FieldError as exc:
            raise InvalidConfig(f"{exc.field}: {exc.message}", field=exc.field) from None

    def note(self, msg: str, level: str = "info", **data: Any) -> None:
        """A note kept in the job result and logged to the job's timeline."""
        self.notes.append(msg)
        self.rep.log(msg, level=level, data=data or None)

    # -- 1. calibration --------------------------------------------------------------------------------
    def calibrate(self) -> CalibrationSet:
        seqlen = self.cfg["model_seqlen"] or default_seqlen(self.ctx.config)
        with self.clock("calibration data"):
            calib = self.calibration_windows(seqlen)
        self.rep.log(f"calibration: {calib.nsamples} samples x {calib.seqlen} tokens from {calib.source} "
                     f"({calib.text_tokens:,} tokens of text, {calib.distinct_tokens:,} distinct in the windows)",
                     data=calib.describe())
        for warning in calib.warnings:
            self.note(warning, level="warning")
        self.rep.progress(1, 2, message="calibration data tokenized")
        self._note_block_input_mode()
        if self.fmt_reason:
            self.note(self.fmt_reason)
        return calib

    def calibration_windows(self, seqlen: int) -> CalibrationSet:
        """Token windows from `dataset`, tokenized with the source's tokenizer."""
        from transformers import AutoTokenizer

        cfg, ctx = self.cfg, self.ctx
        tok = AutoTokenizer.from_pretrained(str(ctx.source_dir), trust_remote_code=ctx.options.allow_remote_code)
        return load_calibration(cfg["dataset"], tok, nsamples=cfg["nsamples"] or DEFAULT_NSAMPLES, seqlen=seqlen,
                                seed=cfg["seed"], sources=ctx.options.calibration_sources())

    def _note_block_input_mode(self) -> None:
        layer_types = getattr(self.layout.hf_config.get_text_config(), "layer_types", None)
        if self.cache_outputs and isinstance(layer_types, (list, tuple)) and len(set(layer_types)) > 1:
            self.note(f"blocks of different types ({', '.join(sorted(set(map(str, layer_types))))}) all calibrated "
                      "with the first block's mask and position inputs; cache_block_outputs=false gives each block "
                      "its own", level="warning")
        if not self.cache_outputs:
            self.note("cache_block_outputs=false: each block's inputs are recomputed from the embeddings through "
                      "the quantized blocks before it (n(n+1)/2 block forwards; quantized blocks kept in memory)")

    # -- 2. inputs of the first block --------------------------------------------------------------------
    def capture_first_block_inputs(self, calib: CalibrationSet) -> BlockInputs:
        bs = self.cfg["batch_size"]
        batches = [calib.input_ids[i : i + bs] for i in range(0, calib.nsamples, bs)]
        hidden_size = int(getattr(self.layout.hf_config.get_text_config(), "hidden_size", 0) or 0)
        act_bytes = calib.tokens * max(hidden_size, 1) * torch.finfo(self.dtype).bits // 8
        store = activation_device(self.device, act_bytes)
        if store != self.device:
            self.note(f"calibration activations ({act_bytes / 2**30:.1f} GiB) kept on the CPU")
        meta = build_meta_model(self.layout.hf_config, allow_remote_code=self.ctx.options.allow_remote_code)
        pre = self.ctx.reader.load_many(self.layout.pre_tensors)
        with self.clock("capture first-block inputs"):
            capture = BlockInputCapture(meta, self.layout.block_name, pre, device=self.device, dtype=self.dtype)
            hidden, rest = capture.capture(batches, [], 0, store)
        self.rep.progress(2, 2, message="first-block inputs captured")
        for name, t in pre.items():
            self.ctx.writer.add(name, stored_float(t))
        self.blocks = capture.blocks  # the meta blocks, materialized one at a time
        return BlockInputs(hidden, rest, batches, store, capture=None if self.cache_outputs else capture)

    # -- 3. the blocks -----------------------------------------------------------------------------------
    def quantize_blocks(self, inputs: BlockInputs) -> None:
        """The `quantize` stage: every block in order, each on the outputs of the quantized blocks before it.

        The next block's tensors are read from the checkpoint (into pinned memory on CUDA, for a fast copy to
        the device) on a background thread while the current block is quantized."""
        self.rep.stage("quantize", total=self.layout.num_blocks)
        self.t_start = time.monotonic()
        blocks = self.layout.blocks
        with ThreadPoolExecutor(1, thread_name_prefix="block-prefetch") as pool:
            pending = pool.submit(self._read_block, blocks[0]) if blocks else None
            for i, binfo in enumerate(blocks):
                current = pending
                pending = pool.submit(self._read_block, blocks[i + 1]) if i + 1 < len(blocks) else None
                try:
                    self.quantize_block(binfo, inputs, current)
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                    raise

    def _read_block(self, binfo: BlockInfo) -> dict[str, torch.Tensor]:
        tensors = self.ctx.reader.load_prefix(binfo.prefix)
        if self.device.type == "cuda":
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors

    def quantize_block(self, binfo: BlockInfo, inputs: BlockInputs,
                       prefetched: Future | None = None) -> None:
        rep, n, bi = self.rep, self.layout.num_blocks, binfo.index
        rep.check_cancelled()
        prefix = binfo.prefix
        linears = {li.name[len(prefix) + 1 :]: li for li in binfo.linears}
        if inputs.capture is not None and bi > 0:
            with self.clock("recompute block inputs"):
                inputs.hidden, inputs.rest = inputs.capture.capture(inputs.batches, inputs.done_blocks, bi,
                                                                   inputs.store)
        with self.clock("load block"):
            tensors = prefetched.result() if prefetched is not None else self._read_block(binfo)
            block = materialize_block(self.blocks[bi], {k[len(prefix) + 1 :]: v for k, v in tensors.items()},
                                      self.device, self.dtype)
        runner = BlockRunner(block, inputs.hidden, inputs.rest, self.device,
                             max_tokens=forward_chunk_tokens(block, self.device))
        if self.groups is None:
            self._plan(block, linears, inputs)
        written: set[str] = set()
        block_metrics: dict[str, Any] = {}
        for classes in self.groups:
            rep.check_cancelled()
            with self.clock("forward + Hessians"):
                accs = runner.collect(classes, lambda n_in: HessianAccumulator(n_in, self.device))
                hessians = {rep_name: acc.finalize() for rep_name, acc in accs.items()}
            del accs
            for cls in classes:
                H = hessians.pop(cls[0])
                factor = self.shared_factor(H, cls, binfo) if len(cls) > 1 else None
                for r in cls:
                    li = linears[r]
                    block_metrics[li.name] = self.quantize_layer(block, r, li, H, binfo, factor)
                    written.update({li.weight_name, li.bias_name})
                del H, factor
        if bi + 1 < n and self.cache_outputs:
            with self.clock("forward quantized block"):
                inputs.hidden = runner.forward_all()
        with self.clock("pack + write"):
            for name, t in tensors.items():
                if name not in written:
                    self.ctx.writer.add(name, stored_float(t))
        if inputs.capture is not None and bi + 1 < n:
            inputs.done_blocks.append(block)
        else:
            block.to("meta")
        del tensors, runner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rep.progress(bi + 1, n, message=f"quantizing block {bi + 1}/{n}", metrics={"layers": block_metrics})

    def _plan(self, block: torch.nn.Module, linears: dict[str, LinearInfo], inputs: BlockInputs) -> None:
        """Which layers are quantized and in which groups: decided on the first block, reused for all."""
        cfg = self.cfg
        classes = discover_input_groups(block, list(linears), inputs.hidden[0], inputs.rest[0][0],
                                        inputs.rest[0][1], self.device)
        groups = sequential_groups(classes, list(linears), true_sequential=cfg["true_sequential"],
                                   modules_in_block=cfg["modules_in_block_to_quantize"])
        self.skipped = skipped_layers(linears, bits=cfg["bits"], group_size=cfg["group_size"],
                                      modules_in_block=cfg["modules_in_block_to_quantize"],
                                      targets=self.ctx.options.targets)
        for r, why in self.skipped.items():
            self.note(f"{self.layout.block_name}.*.{r} kept in float16: {why}", level="warning", module=r)
        self.groups = without(groups, self.skipped)
        if not self.groups:
            raise UnsupportedModel(
                f"no Linear layer of {self.layout.block_name} can be written as {cfg['bits']}-bit GPTQ with "
                f"group_size {cfg['group_size']} so that its consumers load it: "
                + "; ".join(f"{r}: {why}" for r, why in self.skipped.items())
                + " (a group_size that divides the layers' widths, or -1, quantizes them)")

    def shared_factor(self, H: torch.Tensor, cls: list[str], binfo: BlockInfo) -> HessianFactor:
        """The Hessian's factorization once for all the layers of a class (they share their input)."""
        cfg = self.cfg
        with self.clock("gptq"):
            return hessian_factor(H, group_size=cfg["group_size"], damp_percent=cfg["damp_percent"],
                                  desc_act=cfg["desc_act"], act_group_aware=cfg["act_group_aware"],
                                  log=lambda m: self.note(f"{binfo.prefix}.{{{','.join(cls)}}}: {m}",
                                                          level="warning"))

    def quantize_layer(self, block: torch.nn.Module, r: str, li: LinearInfo, H: torch.Tensor,
                       binfo: BlockInfo, factor: HessianFactor | None = None) -> dict[str, float]:
        """GPTQ on one layer of the live block: write its packed tensors, put the quantized weight back into
        the block (the layers after it, and the next block, see the quantized model), report its errors."""
        cfg, rep, n = self.cfg, self.rep, self.layout.num_blocks
        prefix = binfo.prefix
        mod = block.get_submodule(r)
        W = mod.weight.data.t() if li.transposed else mod.weight.data
        with self.clock("gptq"):
            res = gptq_quantize(
                W, H, bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                damp_percent=cfg["damp_percent"], desc_act=cfg["desc_act"], act_group_aware=cfg["act_group_aware"],
                static_groups=cfg["static_groups"], log=lambda m: self.note(f"{prefix}.{r}: {m}", level="warning"),
                factor=factor,
            )
        with self.clock("pack + write"):
            if res.dead_columns:
                rep.log(f"{prefix}.{r}: {res.dead_columns} input channels never active (zeroed)",
                        data={"module": f"{prefix}.{r}", "dead_columns": res.dead_columns})
            err = relative_error(W, res.Q)
            metrics = {"rel_error": err, "sq_error": output_error(W, res.Q, H), "gptq_loss": res.loss,
                       "damp_percent": res.damp_percent}
            self.errors[li.name] = err
            rep.progress(binfo.index, n, message=f"block {binfo.index + 1}/{n}: {r}",
                         metrics={"layer": li.name, "block": binfo.index, **metrics, "columns": li.in_features})
            bias = mod.bias.data if li.has_bias and mod.bias is not None else None
            for suffix, t in pack_layer(res, fmt=self.fmt, bias=bias).items():
                self.ctx.writer.add(f"{li.name}.{suffix}", t)
            with torch.no_grad():
                q = res.Q.t() if li.transposed else res.Q
                mod.weight.data.copy_(q.to(mod.weight.dtype))
            self.quantized.append(li.name)
        return metrics

    # -- 4. after the blocks -----------------------------------------------------------------------------
    def write_tensors_after_blocks(self) -> None:
        for name, t in self.ctx.reader.load_many(self.layout.post_tensors).items():
            self.ctx.writer.add(name, stored_float(t))

    def result(self, calib: CalibrationSet) -> MethodResult:
        cfg, layout = self.cfg, self.layout
        skipped_full = [f"{b.prefix}.{r}" for b in layout.blocks for r in self.skipped]
        qconf = build_quantization_config(
            cfg, fmt=self.fmt, block_name=layout.block_name,
            quantized_in_block=[[m for cls in g for m in cls] for g in self.groups or []],
            skipped_modules=skipped_full, calibration=calib.describe(), quantizer_version=package_version(),
        )
        qset = set(self.quantized)
        shapes = [(li.in_features, li.out_features) for li in layout.all_linears() if li.name in qset]
        loads = engines.gptq_engines(cfg, shapes)
        self.note("loads in: " + ", ".join(e["engine"] for e in loads if e["loads"]) + "; not in: "
                  + "; ".join(f"{e['engine']} ({e['why_not']})" for e in loads if not e["loads"]))
        self.ctx.state["gptq"] = {"bits": cfg["bits"], "format": self.fmt, "quantized": self.quantized,
                                  "seconds": time.monotonic() - self.t_start, "timings": self.timings}
        return MethodResult(
            quantization_config=qconf,
            skipped_modules=skipped_full + [li.name for li in layout.outside_linears],
            quantized_modules=self.quantized,
            layer_errors=self.errors,
            config_updates={"torch_dtype": "float16", "dtype": "float16"},
            extra_json_files={"quantize_config.json": qconf},
            notes=self.notes,
            details={
                "checkpoint_format": {"written": self.fmt, "requested": cfg["format"], "reason": self.fmt_reason},
                "engines": loads,
            },
        )
