"""One compressed-tensors quantization, as the steps `CompressedTensorsMethod.quantize` calls.

Round to nearest with dynamic (or no) activation quantization reads nothing but the weights: `convert_units`
streams the checkpoint unit by unit (embeddings, each block, the head) and writes each quantized layer as it
goes. A scheme that needs calibration (FP8's static input scales, GPTQ weights, SmoothQuant) runs the blocks:
`calibrate` (token windows), `capture_first_block_inputs`, then per block (`quantize_block`): load it, smooth
it (SmoothQuant: the norm before each attention/MLP input divided by s, the layers after it multiplied by s,
s = max|X|^a / max|W|^(1-a) per input channel), quantize its layers (GPTQ per sequential group of layers
sharing an input, or RTN), put the dequantized weights into the live block, measure each layer's input range
on the quantized block for static input scales, run it to make the next block's inputs, write its tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from qaas.quantization_rules.compressed_tensors import DEFAULT_NSAMPLES, needs_calibration

from ...architecture import BlockInfo, LinearInfo, build_meta_model
from ...blockwise import BlockInputCapture, BlockRunner, compute_dtype, discover_input_groups, materialize_block
from ...calibration_data import CalibrationSet, load_calibration
from ...errors import InvalidConfig
from ...evaluate import default_seqlen, relative_error
from ...gptq_algorithm import gptq_quantize
from ...hessian import HessianAccumulator
from ...progress import PhaseTimer
from ..base import EngineContext, MethodResult
from .format import FP8_MAX, dequantize_int, int_layer_tensors, quantize_weight
from .planning import plan
from .schemes import Scheme, quantization_config, scheme_for

#: SmoothQuant's norm -> layers mappings (llm-compressor's defaults for Llama-style blocks), block-relative.
SMOOTHING_MAPPINGS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)


class AbsMax:
    """max |x| of every input seen (static per-tensor input scales)."""

    def __init__(self, in_features: int) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().abs().amax().float()
        self.value = m if self.value is None else torch.maximum(self.value, m)


class ChannelAbsMax:
    """max |x| per input channel over every token seen (SmoothQuant's activation scales)."""

    def __init__(self, in_features: int) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.value = m if self.value is None else torch.maximum(self.value, m)


class CTRun:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.quantization_config
        self.scheme: Scheme = scheme_for(self.cfg)
        self.layout = ctx.layout
        self.rep = ctx.reporter
        self.device = ctx.device
        self.calibrated = needs_calibration(self.cfg)
        self.to_quantize, self.kept = plan(self.cfg, self.scheme, self.layout, calibrated=self.calibrated)
        self.notes: list[str] = []
        self.errors: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.clock = PhaseTimer(self.device, self.timings)
        self.input_ranges: dict[str, float] = {}
        self.smoothed: list[str] = []
        #: block-relative names of the layers smoothed in the current block (their weights come from the block)
        self.smoothed_here: set[str] = set()
        for name, why in sorted(self.kept.items()):
            if not why.startswith(("ignored", "weight not stored")):
                self.note(f"{name} kept in floating point: {why}", level="warning", module=name)

    def note(self, msg: str, level: str = "info", **data: Any) -> None:
        self.notes.append(msg)
        self.rep.log(msg, level=level, data=data or None)

    # -- round to nearest, streamed ----------------------------------------------------------------------
    def convert_units(self) -> None:
        n, done = self.layout.num_blocks, 0
        for unit in self.layout.units():
            self.rep.check_cancelled()
            block_errors: dict[str, float] = {}
            weights = {li.weight_name: li for li in unit.linears if li.name in self.to_quantize}
            tensors = self.ctx.reader.load_many(unit.tensor_names)
            for tname in list(tensors):
                t = tensors.pop(tname)
                li = weights.get(tname)
                if li is None:
                    self.ctx.writer.add(tname, t)
                    continue
                w = t.to(self.device).contiguous()
                with self.clock("quantize"):
                    stored, deq = quantize_weight(w, self.scheme)
                self._write_layer(li, stored)
                block_errors[li.name] = self.errors[li.name] = relative_error(w, deq)
                del w, stored, deq
            if unit.kind == "block":
                done += 1
                metrics: dict[str, Any] = {"block": unit.block.index, "rel_error": block_errors}
                if block_errors:
                    metrics["max_rel_error"] = max(block_errors.values())
                self.rep.progress(done, n, message=f"block {done}/{n}", metrics=metrics)

    def _write_layer(self, li: LinearInfo, stored: dict[str, torch.Tensor]) -> None:
        for suffix, v in stored.items():
            self.ctx.writer.add(f"{li.name}.{suffix}", v)

    # -- calibrated: block by block -----------------------------------------------------------------------
    def calibrate(self) -> CalibrationSet:
        from transformers import AutoTokenizer

        cfg, ctx = self.cfg, self.ctx
        seqlen = cfg["model_seqlen"] or default_seqlen(ctx.config)
        tok = AutoTokenizer.from_pretrained(str(ctx.source_dir), trust_remote_code=ctx.options.allow_remote_code)
        calib = load_calibration(cfg["dataset"], tok, nsamples=cfg["nsamples"] or DEFAULT_NSAMPLES, seqlen=seqlen,
                                 seed=cfg["seed"], sources=ctx.options.calibration_sources())
        self.rep.log(f"calibration: {calib.nsamples} samples x {calib.seqlen} tokens from {calib.source}",
                     data=calib.describe())
        for warning in calib.warnings:
            self.note(warning, level="warning")
        self.rep.progress(1, 2, message="calibration data tokenized")
        return calib

    def run_blocks(self, calib: CalibrationSet) -> None:
        self.dtype = compute_dtype(self.device, self.ctx.config)
        batches = [calib.input_ids[i : i + 1] for i in range(calib.nsamples)]
        meta = build_meta_model(self.layout.hf_config, allow_remote_code=self.ctx.options.allow_remote_code)
        pre = self.ctx.reader.load_many(self.layout.pre_tensors)
        capture = BlockInputCapture(meta, self.layout.block_name, pre, device=self.device, dtype=self.dtype)
        hidden, rest = capture.capture(batches, [], 0, self.device)
        self.rep.progress(2, 2, message="first-block inputs captured")
        for name, t in pre.items():
            self.ctx.writer.add(name, t)
        del pre
        self.rep.stage("quantize", total=self.layout.num_blocks)
        self.classes: list[list[str]] | None = None
        for binfo in self.layout.blocks:
            hidden = self.quantize_block(binfo, capture.blocks[binfo.index], hidden, rest)
        for name, t in self.ctx.reader.load_many(self.layout.post_tensors).items():
            self.ctx.writer.add(name, t)

    def quantize_block(self, binfo: BlockInfo, meta_block: torch.nn.Module, hidden: list[torch.Tensor],
                       rest: list) -> list[torch.Tensor]:
        rep, n, prefix = self.rep, self.layout.num_blocks, binfo.prefix
        rep.check_cancelled()
        tensors = self.ctx.reader.load_prefix(prefix)
        local = {k[len(prefix) + 1 :]: v for k, v in tensors.items()}
        block = materialize_block(meta_block, local, self.device, self.dtype)
        runner = BlockRunner(block, hidden, rest, self.device)
        linears = {li.name[len(prefix) + 1 :]: li for li in binfo.linears if li.name in self.to_quantize}
        if self.classes is None:
            names = [li.name[len(prefix) + 1 :] for li in binfo.linears]
            self.classes = discover_input_groups(block, names, hidden[0], rest[0][0], rest[0][1], self.device)
        replaced: dict[str, torch.Tensor] = {}  # block-relative tensor name -> new value (smoothed norms)
        if self.cfg["smoothing_strength"] is not None:
            with self.clock("smoothing"):
                replaced.update(self.smooth(block, runner, binfo))
        written: set[str] = set()
        block_errors: dict[str, float] = {}
        if self.cfg["weights"] == "gptq":
            for cls in self.classes:
                members = [r for r in cls if r in linears]
                if not members:
                    continue
                rep.check_cancelled()
                with self.clock("forward + Hessians"):
                    acc = runner.collect([members], lambda n_in: HessianAccumulator(n_in, self.device))
                    H = acc[members[0]].finalize()
                for r in members:
                    block_errors[linears[r].name] = self.gptq_layer(block, r, linears[r], H, local)
                    written.add(linears[r].weight_name)
                del H, acc
        else:
            for r, li in linears.items():
                mod = block.get_submodule(r)
                src = local[r + ".weight"] if r not in self.smoothed_here else mod.weight.data
                w = src.to(self.device, local[r + ".weight"].dtype).contiguous()
                with self.clock("quantize"):
                    stored, deq = quantize_weight(w, self.scheme)
                self._write_layer(li, stored)
                block_errors[li.name] = self.errors[li.name] = relative_error(w, deq)
                with torch.no_grad():
                    mod.weight.data.copy_(deq.to(mod.weight.dtype))
                written.add(li.weight_name)
        if self.scheme.static_inputs:
            with self.clock("input scales"):
                self.static_input_scales(runner, linears, local)
        out = runner.forward_all() if binfo.index + 1 < n else hidden
        for name, t in tensors.items():
            rel = name[len(prefix) + 1 :]
            if name in written:
                continue
            self.ctx.writer.add(name, replaced[rel] if rel in replaced else t)
        block.to("meta")
        del tensors, local, runner
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        metrics: dict[str, Any] = {"block": binfo.index, "rel_error": block_errors}
        if block_errors:
            metrics["max_rel_error"] = max(block_errors.values())
        rep.progress(binfo.index + 1, n, message=f"block {binfo.index + 1}/{n}", metrics=metrics)
        return out

    def smooth(self, block: torch.nn.Module, runner: BlockRunner, binfo: BlockInfo) -> dict[str, torch.Tensor]:
        """SmoothQuant on the block's norm -> layers mappings; returns the smoothed norm weights (stored dtype)."""
        alpha = self.cfg["smoothing_strength"]
        self.smoothed_here: set[str] = set()
        mappings = [(norm, layers) for norm, layers in SMOOTHING_MAPPINGS
                    if _has(block, norm) and all(_has(block, l) for l in layers)]
        if not mappings or self.layout.model_type.startswith("gemma"):
            raise InvalidConfig(f"smoothing_strength: no SmoothQuant mapping is known for {self.layout.architecture} "
                                "(Llama-style input_layernorm/post_attention_layernorm blocks); leave it out",
                                field="smoothing_strength")
        stats = runner.collect([[layers[0]] for _, layers in mappings], ChannelAbsMax)
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for norm, layers in mappings:
                act = stats[layers[0]].value.to(self.device)
                wmax = torch.stack([block.get_submodule(l).weight.abs().amax(dim=0).float() for l in layers])
                wmax = wmax.amax(dim=0).clamp(min=1e-5)
                s = act.pow(alpha) / wmax.pow(1 - alpha)
                s = torch.where(wmax > 0, s, act).clamp(min=1e-5)
                nmod = block.get_submodule(norm)
                nmod.weight.data = (nmod.weight.float() / s).to(nmod.weight.dtype)
                stored_dtype = self.ctx.reader.info(f"{binfo.prefix}.{norm}.weight").dtype
                out[f"{norm}.weight"] = nmod.weight.data.to(stored_dtype).cpu()
                for l in layers:
                    lmod = block.get_submodule(l)
                    lmod.weight.data = (lmod.weight.float() * s).to(lmod.weight.dtype)
                    self.smoothed_here.add(l)
        if binfo.index == 0:
            self.smoothed = [f"{norm} -> {', '.join(layers)}" for norm, layers in mappings]
            self.note(f"SmoothQuant (alpha {alpha:g}) on every block: " + "; ".join(self.smoothed))
        return out

    def gptq_layer(self, block: torch.nn.Module, r: str, li: LinearInfo, H: torch.Tensor,
                   local: dict[str, torch.Tensor]) -> float:
        scheme, bits = self.scheme, self.scheme.bits
        mod = block.get_submodule(r)
        W = mod.weight.data
        stored_dtype = local[r + ".weight"].dtype
        with self.clock("gptq"):
            res = gptq_quantize(W, H, bits=bits, group_size=scheme.group_size or -1, sym=True,
                                damp_percent=self.cfg["dampening_frac"], desc_act=scheme.group_size is None,
                                act_group_aware=scheme.group_size is not None, scale_dtype=stored_dtype,
                                log=lambda m: self.note(f"{li.name}: {m}", level="warning"))
        # symmetric GPTQ codes sit around a zero of 2^(bits-1): the signed codes compressed-tensors stores
        codes = (res.codes - (1 << (bits - 1))).to(torch.int8)
        scale = res.scales.t().contiguous().to(stored_dtype)  # [out, groups]
        deq = dequantize_int(codes, scale)
        self._write_layer(li, int_layer_tensors(scheme, codes, scale))
        err = self.errors[li.name] = relative_error(W, deq)
        with torch.no_grad():
            mod.weight.data.copy_(deq.to(mod.weight.dtype))
        return err

    def static_input_scales(self, runner: BlockRunner, linears: dict[str, LinearInfo],
                            local: dict[str, torch.Tensor]) -> None:
        """input_scale = max |input| over the calibration tokens / 448, per layer, in the stored dtype."""
        stats = runner.collect([[r] for r in linears], AbsMax)
        for r, li in linears.items():
            dtype = local[r + ".weight"].dtype
            absmax = stats[r].value.to(dtype).reshape(1)
            scale = absmax / (torch.tensor(2 * FP8_MAX, dtype=dtype, device=absmax.device) / 2)
            scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device),
                                scale)
            self.ctx.writer.add(f"{li.name}.input_scale", scale.cpu())
            self.input_ranges[li.name] = float(absmax)

    # -- result --------------------------------------------------------------------------------------------
    def result(self, calib: CalibrationSet | None) -> MethodResult:
        kept = sorted(self.kept)
        qconf = quantization_config(self.scheme, kept)
        self.ctx.state["compressed_tensors"] = {"quantized": sorted(self.to_quantize), "timings": self.timings}
        return MethodResult(
            quantization_config=qconf,
            skipped_modules=kept,
            quantized_modules=sorted(self.to_quantize),
            layer_errors=self.errors,
            notes=self.notes,
            calibration=calib.describe() if calib is not None else None,
        )


def _has(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def quantize_model(ctx: EngineContext) -> MethodResult:
    run = CTRun(ctx)
    if not run.calibrated:
        run.convert_units()
        return run.result(None)
    calib = run.calibrate()
    ctx.state["calibration_windows"] = calib.input_ids  # evaluation leaves out windows sharing text with them
    run.run_blocks(calib)
    return run.result(calib)
