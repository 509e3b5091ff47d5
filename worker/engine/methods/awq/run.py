"""One AWQ quantization of one model, as the steps `AWQMethod.quantize` calls in order:

1. `calibrate`: the `dataset` becomes `nsamples` token windows of `model_seqlen` tokens (AutoAWQ: 128 x 512);
2. `capture_first_block_inputs`: the model without its blocks runs them up to the first block; the tensors
   before the blocks are written;
3. `quantize_blocks`, the `quantize` stage, per block (`quantize_block`):
   a. one float forward of the block over every batch, keeping each Linear's input, each scaling group's
      inspected submodule's inputs and output, and the block's output (the next block's input: AutoAWQ
      calibrates every block on the float model's activations);
   b. per scaling group, the grid search of its scales on the untouched float block (`search.search_scales`);
   c. all scales folded into the block (`search.apply_scales`), the captured inputs divided by them;
   d. per quantized layer (bar q/k, as AutoAWQ), the clipping search, then the final group quantization,
      packed and written; the block's float tensors (with the folded scales: norms, v_proj/up_proj rows of
      layers kept in float16) are written from the live block;
4. `write_tensors_after_blocks`, then `result`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qaas.quantization_rules.awq import DEFAULT_NSAMPLES, N_GRID

from ...architecture import BlockInfo, LinearInfo, build_meta_model
from ...blockwise import BlockInputCapture, compute_dtype, materialize_block
from ...calibration_data import CalibrationSet, load_calibration
from ...evaluate import relative_error
from ...progress import PhaseTimer
from ..base import EngineContext, MethodResult
from . import search
from .format import build_quantization_config, pack_layer, stored_float
from .planning import PlannedGroup, plan_groups, skipped_layers

#: Tokens per calibration batch (windows are grouped so that a batch holds about this many).
BATCH_TOKENS = 4096
#: AutoAWQ does not clip q/k: their outputs meet in a softmax, where a per-layer output MSE misleads.
NO_CLIP = ("q_", "k_")


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]
    rest: list[tuple[tuple, dict[str, Any]]]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockCapture:
    """What one float forward of a block over the calibration batches leaves behind (step 3a)."""

    def __init__(self) -> None:
        #: Linear name -> its input per batch.
        self.x: dict[str, list[torch.Tensor]] = {}
        #: inspected submodule -> (args, kwargs) per batch, and its float output per batch.
        self.calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = {}
        self.outputs: dict[str, list[torch.Tensor]] = {}
        #: The block's output per batch.
        self.block_out: list[torch.Tensor] = []

    @torch.no_grad()
    def record(self, block: torch.nn.Module, inputs: BlockInputs, linears: list[str], inspected: list[str],
               device: torch.device) -> None:
        hooks = []
        for name in linears:
            self.x[name] = []

            def lin_hook(m, inp, out, name=name):
                self.x[name].append(inp[0].detach())

            hooks.append(block.get_submodule(name).register_forward_hook(lin_hook))
        for name in inspected:
            self.calls[name], self.outputs[name] = [], []

            def pre(m, args, kwargs, name=name):
                self.calls[name].append((tuple(args), dict(kwargs)))

            def post(m, args, kwargs, out, name=name):
                self.outputs[name].append(_first(out).detach())

            mod = block.get_submodule(name)
            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(mod.register_forward_hook(post, with_kwargs=True))
        try:
            for h, (args, kw) in zip(inputs.hidden, inputs.rest):
                y = _first(block(h.to(device), *args, **kw))
                self.block_out.append(y.to(h.device))
        finally:
            for hk in hooks:
                hk.remove()

    @torch.no_grad()
    def run(self, block: torch.nn.Module, name: str) -> list[torch.Tensor]:
        """The inspected submodule `name` of the block, as it is now, on every captured batch."""
        mod = block.get_submodule(name)
        return [_first(mod(*args, **kw)) for args, kw in self.calls[name]]


class AWQRun:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.quantization_config
        self.layout = ctx.layout
        self.rep = ctx.reporter
        self.device = ctx.device
        self.dtype = compute_dtype(ctx.device, ctx.config)
        self.gs: int = self.cfg["group_size"]
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.clock = PhaseTimer(self.device, self.timings)
        self.quantized: list[str] = []
        self.errors: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.groups: list[PlannedGroup] | None = None
        #: Per block index: {group prev name: chosen alpha}.
        self.alphas: dict[int, dict[str, float]] = {}
        self.t_start = 0.0

    def note(self, msg: str, level: str = "info", **data: Any) -> None:
        self.notes.append(msg)
        self.rep.log(msg, level=level, data=data or None)

    # -- 1. calibration --------------------------------------------------------------------------------
    def calibrate(self) -> CalibrationSet:
        from transformers import AutoTokenizer

        cfg, ctx = self.cfg, self.ctx
        context = ctx.config.get("max_position_embeddings") or (ctx.config.get("text_config") or {}).get(
            "max_position_embeddings") or cfg["model_seqlen"]
        seqlen = min(cfg["model_seqlen"], int(context))
        with self.clock("calibration data"):
            tok = AutoTokenizer.from_pretrained(str(ctx.source_dir), trust_remote_code=ctx.options.allow_remote_code)
            calib = load_calibration(cfg["dataset"], tok, nsamples=cfg["nsamples"] or DEFAULT_NSAMPLES,
                                     seqlen=seqlen, seed=cfg["seed"], sources=ctx.options.calibration_sources())
        self.rep.log(f"calibration: {calib.nsamples} samples x {calib.seqlen} tokens from {calib.source} "
                     f"({calib.text_tokens:,} tokens of text, {calib.distinct_tokens:,} distinct in the windows)",
                     data=calib.describe())
        for warning in calib.warnings:
            self.note(warning, level="warning")
        self.rep.progress(1, 2, message="calibration data tokenized")
        return calib

    # -- 2. inputs of the first block --------------------------------------------------------------------
    def capture_first_block_inputs(self, calib: CalibrationSet) -> BlockInputs:
        bs = max(1, BATCH_TOKENS // calib.seqlen)
        batches = [calib.input_ids[i : i + bs] for i in range(0, calib.nsamples, bs)]
        meta = build_meta_model(self.layout.hf_config, allow_remote_code=self.ctx.options.allow_remote_code)
        pre = self.ctx.reader.load_many(self.layout.pre_tensors)
        with self.clock("capture first-block inputs"):
            capture = BlockInputCapture(meta, self.layout.block_name, pre, device=self.device, dtype=self.dtype)
            hidden, rest = capture.capture(batches, [], 0, self.device)
        self.rep.progress(2, 2, message="first-block inputs captured")
        for name, t in pre.items():
            self.ctx.writer.add(name, stored_float(t))
        self.blocks = capture.blocks
        return BlockInputs(hidden, rest)

    # -- 3. the blocks -----------------------------------------------------------------------------------
    def quantize_blocks(self, inputs: BlockInputs) -> None:
        self.rep.stage("quantize", total=self.layout.num_blocks)
        self.t_start = time.monotonic()
        for binfo in self.layout.blocks:
            self.quantize_block(binfo, inputs)

    def quantize_block(self, binfo: BlockInfo, inputs: BlockInputs) -> None:
        rep, n, bi, prefix = self.rep, self.layout.num_blocks, binfo.index, binfo.prefix
        rep.check_cancelled()
        linears = {li.name[len(prefix) + 1 :]: li for li in binfo.linears}
        with self.clock("load block"):
            tensors = self.ctx.reader.load_prefix(prefix)
            block = materialize_block(self.blocks[bi], {k[len(prefix) + 1 :]: v for k, v in tensors.items()},
                                      self.device, self.dtype)
        if self.groups is None:
            self._plan(block, linears)
        quantize = [r for r in linears if r not in self.skipped]
        cap = BlockCapture()
        with self.clock("float forward"):
            inspected = sorted({pg.group.inspect for pg in self.groups if pg.group.inspect not in linears})
            cap.record(block, inputs, list(linears), inspected, self.device)
        block_metrics: dict[str, Any] = {}
        # b. every group's search on the float block, then c. all scales folded in (AutoAWQ's order)
        found: list[tuple[PlannedGroup, search.ScaleSearch]] = []
        with self.clock("scale search"):
            for pg in self.groups:
                found.append((pg, self._search_group(block, pg, cap, rep.check_cancelled)))
        alphas = {pg.group.prev: res.alpha for pg, res in found}
        searched = {pg.group.prev: {"alpha": res.alpha, "loss": res.loss, "loss_alpha_0": res.losses[0]}
                    for pg, res in found}
        self.alphas[bi] = alphas
        with torch.no_grad():
            for pg, res in found:
                g, s = pg.group, res.scales
                search.apply_scales(block.get_submodule(g.prev), g.prev_kind,
                                    [block.get_submodule(r) for r in g.layers], s)
                # the group's layers read the same input: views of one storage per batch, divided once
                seen: set[int] = set()
                for r in g.layers:
                    for x in cap.x[r]:
                        if x.data_ptr() not in seen:
                            seen.add(x.data_ptr())
                            x.div_(s.to(x.device, x.dtype))
        # d. clip, quantize, write
        written: set[str] = set()
        for r in quantize:
            rep.check_cancelled()
            li = linears[r]
            block_metrics[li.name] = self.quantize_layer(block, r, li, cap, binfo)
            written.update({li.weight_name, li.bias_name})
        with self.clock("pack + write"):
            state = block.state_dict()
            for name, t in tensors.items():
                if name in written:
                    continue
                rel = name[len(prefix) + 1 :]
                self.ctx.writer.add(name, stored_float(state[rel] if rel in state else t))
        inputs.hidden = cap.block_out
        block.to("meta")
        del tensors, cap, found
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        rep.progress(bi + 1, n, message=f"quantizing block {bi + 1}/{n}",
                     metrics={"layers": block_metrics, "alphas": alphas, "scale_search": searched})

    def _search_group(self, block: torch.nn.Module, pg: PlannedGroup, cap: BlockCapture,
                      check_cancelled: Callable[[], None]) -> search.ScaleSearch:
        g = pg.group
        layers = [block.get_submodule(r) for r in g.layers]
        if g.inspect in cap.calls:
            reference, run = cap.outputs[g.inspect], (lambda: cap.run(block, g.inspect))
        else:  # the group is one Linear layer: its own output on its captured inputs
            mod = block.get_submodule(g.inspect)
            with torch.no_grad():
                reference = [mod(x) for x in cap.x[g.inspect]]
            run = lambda: [mod(x) for x in cap.x[g.inspect]]  # noqa: E731
        x_mean = search.channel_mean_abs(cap.x[g.layers[0]])
        return search.search_scales(layers, [r in pg.quantized for r in g.layers], x_mean, run, reference,
                                    group_size=self.gs, n_grid=N_GRID, duo_scaling=self.cfg["duo_scaling"],
                                    check_cancelled=check_cancelled)

    def _plan(self, block: torch.nn.Module, linears: dict[str, LinearInfo]) -> None:
        self.skipped = skipped_layers(linears, group_size=self.gs,
                                      modules_to_not_convert=self.cfg["modules_to_not_convert"])
        for r, why in self.skipped.items():
            self.note(f"{self.layout.block_name}.*.{r} kept in float16: {why}", level="warning", module=r)
        self.groups = plan_groups(self.ctx.config, block, linears, self.skipped)
        unscaled = [r for r in linears if r not in self.skipped
                    and not any(r in pg.group.layers for pg in self.groups)]
        if unscaled:
            self.note(f"no scaling group for {', '.join(unscaled)} in this architecture (e.g. grouped-query attention "
                      "leaves o_proj without one): quantized with clipping only", module=unscaled)

    def quantize_layer(self, block: torch.nn.Module, r: str, li: LinearInfo, cap: BlockCapture,
                       binfo: BlockInfo) -> dict[str, float]:
        mod = block.get_submodule(r)
        original = mod.weight.data.float().clone()
        if self.cfg["apply_clip"] and not any(k in r.rpartition(".")[2] for k in NO_CLIP):
            with self.clock("clip search"):
                bound = search.search_clip(mod.weight.data, cap.x[r], group_size=self.gs)
                search.apply_clip(mod, bound, self.gs)
        with self.clock("quantize"):
            q = search.group_quantize(mod.weight.data, self.gs)
        with self.clock("pack + write"):
            err = relative_error(original, q.w_hat)
            self.errors[li.name] = err
            bias = mod.bias.data if li.has_bias and mod.bias is not None else None
            for suffix, t in pack_layer(q.codes, q.scales, q.zeros, bias=bias).items():
                self.ctx.writer.add(f"{li.name}.{suffix}", t)
            with torch.no_grad():
                mod.weight.data.copy_(q.w_hat.to(mod.weight.dtype))
            self.quantized.append(li.name)
        metrics = {"rel_error": err}
        self.rep.progress(binfo.index, self.layout.num_blocks, message=f"block {binfo.index + 1}: {r}",
                          metrics={"layer": li.name, "block": binfo.index, **metrics, "columns": li.in_features})
        return metrics

    # -- 4. after the blocks -----------------------------------------------------------------------------
    def write_tensors_after_blocks(self) -> None:
        for name, t in self.ctx.reader.load_many(self.layout.post_tensors).items():
            self.ctx.writer.add(name, stored_float(t))

    def result(self, calib: CalibrationSet) -> MethodResult:
        layout = self.layout
        skipped_full = [f"{b.prefix}.{r}" for b in layout.blocks for r in self.skipped]
        listed = list(self.cfg["modules_to_not_convert"] or [])
        not_convert = listed + [m for m in skipped_full if not any(e in m for e in listed)]
        qconf = build_quantization_config(self.cfg, modules_to_not_convert=not_convert)
        self.ctx.state["awq"] = {"group_size": self.gs, "quantized": self.quantized, "alphas": self.alphas,
                                 "seconds": time.monotonic() - self.t_start, "timings": self.timings}
        return MethodResult(
            quantization_config=qconf,
            skipped_modules=skipped_full + [li.name for li in layout.outside_linears],
            quantized_modules=self.quantized,
            layer_errors=self.errors,
            config_updates={"torch_dtype": "float16", "dtype": "float16"},
            notes=self.notes,
            calibration=calib.describe(),
        )
