"""One GPTQ quantization of one model, as the steps `GPTQMethod.quantize` calls in order:

1. `calibrate`: the `dataset` becomes `nsamples` token windows of `model_seqlen` tokens, cut into batches;
2. `capture_first_block_inputs`: the model without its blocks runs the batches up to the first block;
   the tensors before the blocks are written;
3. `quantize_blocks`, the `quantize` stage: for each block (`quantize_block`), load it, plan its layers (first block only), and per sequential group
   accumulate the Hessians of the group's inputs shard by shard (`hessian.sum_over_shards`), quantize each layer
   (`quantize_group`: `compute_layer` -- GPTQ, pack -- on the layer's rank, `apply_layer` -- write, put the
   quantized weight into the live block -- everywhere); then run the *quantized* block to produce the next
   block's inputs and write the block's unquantized tensors. With the evaluation beside the quantization
   (`beside_eval`, `ctx.evaluation_beside`), the evaluation windows go through each block too: the original
   model's just after it is loaded, the quantized model's once all its layers are quantized (rank 0 alone);

On several GPUs (`options.gpus`) every rank runs these same steps (`ranks`): its own shards of the calibration
batches through each block, its share of the layers; rank 0 alone reads the calibration data, plans, reports
and writes, and the checkpoint is the same, byte for byte, as one process writes.
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
from ...block_memo import memo_budget
from ...blockwise import (BlockInputCapture, BlockRunner, compute_dtype, discover_input_groups,
                          forward_chunk_tokens, materialize_block)
from ...calibration_data import CalibrationSet, load_calibration
from ...errors import InvalidConfig, UnsupportedModel
from ...evaluate import default_seqlen, relative_error
from ...progress import PhaseTimer
from ...version import package_version
from ..base import EngineContext, MethodResult
from ...gptq_algorithm import HessianFactor, gptq_quantize_stacked, hessian_factor, output_error
from .format import build_quantization_config, pack_layer, stored_float
from ...hessian import HessianAccumulator, sum_over_shards
from ...ranks import Ranks, calibration_shards
from .planning import activation_device, sequential_groups, skipped_layers, without


@dataclass
class BlockInputs:
    """The calibration inputs of the block about to be quantized, and what makes the next block's."""

    #: Hidden states per batch, and (other positional args, keyword args) per batch: of this rank's shards'
    #: batches (all of them in a one-process job).
    hidden: list[torch.Tensor]
    rest: list[tuple[tuple, dict[str, Any]]]
    batches: list[torch.Tensor]
    #: This rank's calibration shards: position among all shards -> indices into `hidden`.
    shards: dict[int, list[int]]
    #: How many (non-empty) shards the calibration batches are cut into, over all ranks.
    shard_count: int
    #: Where the activations are kept (the device, or the CPU when they do not fit).
    store: torch.device
    #: With cache_block_outputs=false: the model before its blocks, and the quantized blocks so far, which
    #: recompute each block's inputs from the embeddings.
    capture: BlockInputCapture | None = None
    done_blocks: list[torch.nn.Module] = field(default_factory=list)


class GPTQRun:
    """One job's GPTQ, in one process or as one of the job's ranks (`ranks`: each rank runs its shards of the
    calibration batches and its share of the layers; rank 0 reports and writes)."""

    def __init__(self, ctx: EngineContext, ranks: Ranks | None = None) -> None:
        self.ctx = ctx
        self.ranks = ranks or Ranks.alone(ctx.device)
        self.cfg = ctx.quantization_config
        self.layout = ctx.layout
        self.rep = ctx.reporter
        self.device = ctx.device
        self.dtype = compute_dtype(ctx.device, ctx.config)
        self.cache_outputs: bool = self.cfg["cache_block_outputs"]
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.clock = PhaseTimer(self.device, self.timings)
        #: The evaluation windows riding this run's blocks (`beside_eval`): rank 0 alone runs them.
        self.beside = ctx.evaluation_beside if self.ranks.first else None
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
        """Rank 0 reads and tokenizes the calibration data; the other ranks get its windows."""
        if not self.ranks.first:
            return self.ranks.broadcast_object(None, src=0)
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
        return self.ranks.broadcast_object(calib, src=0)

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
        every_batch = [calib.input_ids[i : i + bs] for i in range(0, calib.nsamples, bs)]
        # this rank keeps the activations of its own shards only, through every block
        shards = calibration_shards(len(every_batch))
        mine = [pos for pos in range(len(shards)) if self.ranks.owner_of_shard(pos) == self.ranks.rank]
        batches = [every_batch[b] for pos in mine for b in shards[pos]]
        local, start = {}, 0
        for pos in mine:
            local[pos] = list(range(start, start + len(shards[pos])))
            start += len(shards[pos])
        hidden_size = int(getattr(self.layout.hf_config.get_text_config(), "hidden_size", 0) or 0)
        act_bytes = sum(b.numel() for b in batches) * max(hidden_size, 1) * torch.finfo(self.dtype).bits // 8
        store = activation_device(self.device, act_bytes)
        if store != self.device:
            self.note(f"calibration activations ({act_bytes / 2**30:.1f} GiB) kept on the CPU")
        meta = build_meta_model(self.layout.hf_config, allow_remote_code=self.ctx.options.allow_remote_code)
        pre = self.ctx.reader.load_many(self.layout.pre_tensors)
        with self.clock("capture first-block inputs"):
            capture = BlockInputCapture(meta, self.layout.block_name, pre, device=self.device, dtype=self.dtype)
            hidden, rest = capture.capture(batches, [], 0, store)
        if self.beside is not None:  # the evaluation windows up to the first block, by the same capture
            self.beside.begin(capture, pre, dtype=self.dtype, stored=stored_float)
        self.rep.progress(2, 2, message="first-block inputs captured")
        for name, t in pre.items():
            self.write(name, stored_float(t))
        self.blocks = capture.blocks  # the meta blocks, materialized one at a time
        return BlockInputs(hidden, rest, batches, local, len(shards), store,
                           capture=None if self.cache_outputs else capture)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor of the output checkpoint, written by rank 0 (every rank has it)."""
        if self.ranks.first:
            self.ctx.writer.add(name, tensor)

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
        # rank 0's pass size for every rank: a shard's passes are then the same whichever rank runs them
        max_tokens = self.ranks.broadcast_object(forward_chunk_tokens(block, self.device), src=0)
        if self.groups is None:
            self._plan(block, linears, inputs)
        runner = BlockRunner(block, inputs.hidden, inputs.rest, self.device, max_tokens=max_tokens,
                             shards=inputs.shards, changing=[r for g in self.groups for cls in g for r in cls],
                             memo_bytes=memo_budget(self.device))
        if self.beside is not None:  # the original model's windows, through the block before it is quantized
            self.beside.before(block, bi)
        written: set[str] = set()
        block_metrics: dict[str, Any] = {}
        for classes in self.groups:
            rep.check_cancelled()
            with self.clock("forward + Hessians"):
                hessians = sum_over_shards(
                    self.ranks, inputs.shard_count,
                    lambda pos: runner.collect(classes, lambda n_in: HessianAccumulator(n_in, self.device), pos))
            block_metrics.update(self.quantize_group(block, classes, linears, hessians, binfo))
            runner.settled(r for cls in classes for r in cls)
            written.update(n for cls in classes for r in cls for n in (linears[r].weight_name, linears[r].bias_name))
            del hessians
        if bi + 1 < n and self.cache_outputs:
            with self.clock("forward quantized block"):
                inputs.hidden = runner.forward_all()
        if self.beside is not None:  # the quantized model's windows, every tensor of the block as stored
            quantized = {linears[r].weight_name for g in self.groups for cls in g for r in cls}
            self.beside.after(block, bi, {k[len(prefix) + 1 :]: stored_float(t) for k, t in tensors.items()
                                          if k not in quantized})
        with self.clock("pack + write"):
            for name, t in tensors.items():
                if name not in written:
                    self.write(name, stored_float(t))
        if inputs.capture is not None and bi + 1 < n:
            inputs.done_blocks.append(block)
        else:
            block.to("meta")
        del tensors, runner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rep.progress(bi + 1, n, message=f"quantizing block {bi + 1}/{n}", metrics={"layers": block_metrics})

    def _plan(self, block: torch.nn.Module, linears: dict[str, LinearInfo], inputs: BlockInputs) -> None:
        """Which layers are quantized and in which groups: decided on the first block by rank 0 (it holds the
        first batch), reused for all blocks by every rank."""
        if self.ranks.first:
            self._plan_here(block, linears, inputs)
        self.groups, self.skipped = self.ranks.broadcast_object((self.groups, self.skipped), src=0)

    def _plan_here(self, block: torch.nn.Module, linears: dict[str, LinearInfo], inputs: BlockInputs) -> None:
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

    def quantize_group(self, block: torch.nn.Module, classes: list[list[str]], linears: dict[str, LinearInfo],
                       hessians: dict[str, torch.Tensor], binfo: BlockInfo) -> dict[str, dict[str, float]]:
        """GPTQ on the layers of one sequential group. Each rank quantizes its share of them (split by cost,
        in_features^2 * out_features: GPTQ's sweep over the columns), those of one class that it holds in one
        column loop (`compute_layers`); then, in the group's order, each layer's
        result travels from its rank to all (`apply_layer`: into every rank's live block, written by rank 0).
        One process owns every layer: the same steps, the same order of writes and events."""
        layers = [(cls, r) for cls in classes for r in cls]
        owners = self.ranks.split_by_cost([linears[r].in_features ** 2 * linears[r].out_features for _, r in layers])
        results: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for cls in classes:
            mine = [r for (c, r), owner in zip(layers, owners) if c is cls and owner == self.ranks.rank]
            if not mine:
                continue
            H = hessians[cls[0]]
            notes: list[str] = []
            # the class's factorization once per rank that quantizes one of its layers; its notes go with
            # the class's first layer (whose rank always computes it), so they are said once
            factor = self.shared_factor(H, cls, binfo, notes.append) if len(cls) > 1 else None
            if cls[0] not in mine:
                notes = []
            results.update(self.compute_layers(block, mine, linears, H, binfo, factor, notes))
            del factor
        block_metrics: dict[str, dict[str, float]] = {}
        for (cls, r), owner in zip(layers, owners):
            tensors, facts = results.pop(r) if owner == self.ranks.rank else (None, None)
            tensors = self.ranks.broadcast_tensors(tensors, src=owner)
            facts = self.ranks.broadcast_object(facts, src=owner)
            block_metrics[linears[r].name] = self.apply_layer(block, r, linears[r], binfo, tensors, facts)
        return block_metrics

    def shared_factor(self, H: torch.Tensor, cls: list[str], binfo: BlockInfo,
                      note: Any) -> HessianFactor:
        """The Hessian's factorization once for all the layers of a class (they share their input)."""
        cfg = self.cfg
        with self.clock("gptq"):
            return hessian_factor(H, group_size=cfg["group_size"], damp_percent=cfg["damp_percent"],
                                  desc_act=cfg["desc_act"], act_group_aware=cfg["act_group_aware"],
                                  log=lambda m: note(f"{binfo.prefix}.{{{','.join(cls)}}}: {m}"))

    def compute_layers(self, block: torch.nn.Module, names: list[str], linears: dict[str, LinearInfo],
                       H: torch.Tensor, binfo: BlockInfo, factor: HessianFactor | None, notes: list[str]
                       ) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """GPTQ on layers of the live block that share the Hessian H, in one column loop
        (`gptq_quantize_stacked`): per layer, its packed tensors and quantized weight ("Q"), and what is said
        about it (errors, warnings, dead input channels; `notes` and the loop's own go with the first layer)."""
        cfg, prefix = self.cfg, binfo.prefix
        mods = [block.get_submodule(r) for r in names]
        Ws = [m.weight.data.t() if linears[r].transposed else m.weight.data for r, m in zip(names, mods)]
        who = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
        with self.clock("gptq"):
            results = gptq_quantize_stacked(
                Ws, H, bits=cfg["bits"], group_size=cfg["group_size"], sym=cfg["sym"],
                damp_percent=cfg["damp_percent"], desc_act=cfg["desc_act"], act_group_aware=cfg["act_group_aware"],
                static_groups=cfg["static_groups"], log=lambda m: notes.append(f"{prefix}.{who}: {m}"),
                factor=factor,
            )
        out: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        for i, (r, mod, W, res) in enumerate(zip(names, mods, Ws, results)):
            with self.clock("pack + write"):
                metrics = {"rel_error": relative_error(W, res.Q), "sq_error": output_error(W, res.Q, H),
                           "gptq_loss": res.loss, "damp_percent": res.damp_percent}
                bias = mod.bias.data if linears[r].has_bias and mod.bias is not None else None
                tensors = {**pack_layer(res, fmt=self.fmt, bias=bias), "Q": res.Q}
            out[r] = (tensors, {"metrics": metrics, "notes": notes if i == 0 else [],
                                "dead_columns": res.dead_columns})
        return out

    def apply_layer(self, block: torch.nn.Module, r: str, li: LinearInfo, binfo: BlockInfo,
                    tensors: dict[str, torch.Tensor], facts: dict[str, Any]) -> dict[str, float]:
        """One quantized layer into the live block (the layers after it, and the next block, see the quantized
        model), its packed tensors written, its errors reported."""
        rep, n, prefix = self.rep, self.layout.num_blocks, binfo.prefix
        metrics = facts["metrics"]
        with self.clock("pack + write"):
            for message in facts["notes"]:
                self.note(message, level="warning")
            if facts["dead_columns"]:
                rep.log(f"{prefix}.{r}: {facts['dead_columns']} input channels never active (zeroed)",
                        data={"module": f"{prefix}.{r}", "dead_columns": facts["dead_columns"]})
            self.errors[li.name] = metrics["rel_error"]
            rep.progress(binfo.index, n, message=f"block {binfo.index + 1}/{n}: {r}",
                         metrics={"layer": li.name, "block": binfo.index, **metrics, "columns": li.in_features})
            Q = tensors.pop("Q")
            for suffix, t in tensors.items():
                self.write(f"{li.name}.{suffix}", t)
            with torch.no_grad():
                mod = block.get_submodule(r)
                mod.weight.data.copy_((Q.t() if li.transposed else Q).to(mod.weight.dtype))
            self.quantized.append(li.name)
        return metrics

    # -- 4. after the blocks -----------------------------------------------------------------------------
    def write_tensors_after_blocks(self) -> None:
        if self.ranks.first:
            for name, t in self.ctx.reader.load_many(self.layout.post_tensors).items():
                self.write(name, stored_float(t))

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
