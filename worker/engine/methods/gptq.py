"""GPTQ (Frantar et al., 2022), layer-wise and sequential, streamed one decoder block at a time.

calibrate: the calibration text (`qaas.worker.engine.calibration`) becomes `nsamples` windows of
  `model_seqlen` tokens; the model without its blocks runs them to the first block (`gptq_blocks`).
quantize, per block: load only this block's tensors, group its Linear layers (true-sequential groups found by
  which layers share an input, or `modules_in_block_to_quantize`), and for each group accumulate the Hessian
  of each shared input, quantize the group's layers (`gptq_algorithm.gptq_quantize`: Triton on CUDA), put the
  quantized weights into the live block, move on; then run the *quantized* block to produce the next block's
  inputs. Packed tensors are written as soon as a block is done (`gptq_format`).

Peak memory: one block, its calibration activations (on the device when they fit, else on the CPU) and
the Hessians of one group.

`cache_block_outputs` (GPTQConfig; optimum's meaning). true (default): the quantized block's outputs on the
  calibration batches are kept and become the next block's inputs; the keyword inputs captured at the first
  block (mask, position embeddings) are reused for every block. false: no block outputs are kept; before
  each block the model runs again from the embeddings through the blocks already quantized (kept in memory)
  into that block, so each block gets the inputs the model itself gives it (per-layer attention types such as
  alternating sliding/full masks, anything a model does between blocks). Costs n(n+1)/2 block forwards
  instead of n and keeps the quantized blocks in memory (about the model's size in the compute dtype):
  for small or non-standard models, not for models larger than the device.

Progress metrics (`reporter.progress(done, total, metrics=...)`), during the `quantize` stage:
  * after each quantized layer, one event with a flat dict (done = blocks finished so far):
    `{"layer": "<module name>", "block": <block index>, "rel_error": ||W - Q||_F / ||W||_F,
      "sq_error": tr((W - Q) H (W - Q)^T) (the squared output error on the calibration inputs, GPTQ's own
      objective; H = 2/n X X^T without damping), "gptq_loss": the algorithm's accumulated loss,
      "damp_percent": the damping actually used, "columns": in_features}`;
  * after each block (unchanged, kept for existing readers): `{"layers": {"<module name>": {"rel_error",
    "sq_error", "gptq_loss", "damp_percent"}}}` with every layer of the block.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..architecture import build_meta_model
from ..calibration import CalibrationSet, load_calibration
from ..errors import InvalidConfig
from ..evaluate import default_seqlen, load_with_replaced_weights, relative_error
from ..gptq_algorithm import gptq_quantize
from ..gptq_blocks import BlockInputCapture, BlockRunner, discover_input_groups, materialize_block
from ..gptq_format import FORMATS, build_quantization_config, dequantize_layer, pack_layer, unsupported_reason
from .base import EngineContext, MethodResult, config_bool

#: GPTQConfig fields this method uses.
FIELDS = {
    "quant_method", "bits", "group_size", "dataset", "damp_percent", "desc_act", "act_group_aware", "sym",
    "true_sequential", "static_groups", "format", "checkpoint_format", "model_seqlen", "batch_size",
    "modules_in_block_to_quantize", "block_name_to_quantize", "module_name_preceding_first_block",
    "cache_block_outputs",
    # qaas extensions: number of calibration windows and the seed of their draw
    "nsamples", "seed",
}
#: GPTQConfig fields that only matter to a loader or to optimum's own pipeline: accepted and ignored.
IGNORED = {"tokenizer", "pad_token_id", "max_input_length", "backend", "meta", "use_exllama", "exllama_config",
           "use_cuda_fp16", "disable_exllama", "lm_head", "quantizer", "dynamic"}


def _get_int(qc: dict[str, Any], key: str, default: int | None) -> int | None:
    v = qc.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidConfig(f"{key} must be an integer", field=key)
    return v


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qaas")
    except Exception:
        return "unknown"


class GPTQMethod:
    name: ClassVar[str] = "gptq"

    # -- request ---------------------------------------------------------------------------------------
    def validate(self, quantization_config: dict[str, Any]) -> dict[str, Any]:
        qc = dict(quantization_config)
        for key in qc:
            if key not in FIELDS and key not in IGNORED:
                raise InvalidConfig(f"{key!r} is not a GPTQ option", field=key)
        bits = _get_int(qc, "bits", None)
        if bits not in (2, 3, 4, 8):
            raise InvalidConfig("bits must be 2, 3, 4 or 8", field="bits")
        group_size = _get_int(qc, "group_size", 128)
        if group_size != -1 and group_size <= 0:
            raise InvalidConfig("group_size must be -1 or positive", field="group_size")
        damp = qc.get("damp_percent", 0.1)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise InvalidConfig("damp_percent must be between 0 and 1", field="damp_percent")
        desc_act = config_bool(qc, "desc_act", False)
        gar = config_bool(qc, "act_group_aware", True) and not desc_act and group_size != -1
        fmt = qc.get("format") or qc.get("checkpoint_format") or "gptq"
        if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
            raise InvalidConfig(f"format must be one of {', '.join(FORMATS)}", field="format")
        if qc.get("format") and qc.get("checkpoint_format") and qc["format"].lower() != qc["checkpoint_format"].lower():
            raise InvalidConfig("format and checkpoint_format disagree", field="checkpoint_format")
        seqlen = _get_int(qc, "model_seqlen", None)
        if seqlen is not None and seqlen < 2:
            raise InvalidConfig("model_seqlen must be at least 2", field="model_seqlen")
        batch_size = _get_int(qc, "batch_size", 1)
        if batch_size < 1:
            raise InvalidConfig("batch_size must be at least 1", field="batch_size")
        nsamples = _get_int(qc, "nsamples", 128)
        if nsamples < 1:
            raise InvalidConfig("nsamples must be at least 1", field="nsamples")
        seed = _get_int(qc, "seed", 0)
        dataset = qc.get("dataset")
        if dataset is None:
            raise InvalidConfig(
                "GPTQ needs calibration data: dataset (a list of strings, 'wikitext2'/'c4'/'c4-new', a Hub "
                "dataset id or a local .txt/.jsonl path)", field="dataset")
        if isinstance(dataset, list):
            if not dataset or not all(isinstance(t, str) for t in dataset):
                raise InvalidConfig("dataset as a list must hold strings", field="dataset")
        elif not isinstance(dataset, str) or not dataset.strip():
            raise InvalidConfig("dataset must be a list of strings or a name", field="dataset")
        mib = qc.get("modules_in_block_to_quantize")
        if mib is not None:
            if (not isinstance(mib, list) or not mib
                    or not all(isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in mib)):
                raise InvalidConfig("modules_in_block_to_quantize must be a list of lists of module names",
                                    field="modules_in_block_to_quantize")
        for key in ("block_name_to_quantize",):
            if qc.get(key) is not None and not isinstance(qc[key], str):
                raise InvalidConfig(f"{key} must be a string", field=key)
        mp = qc.get("module_name_preceding_first_block")
        if mp is not None and not (isinstance(mp, list) and all(isinstance(n, str) for n in mp)):
            raise InvalidConfig("module_name_preceding_first_block must be a list of names",
                                field="module_name_preceding_first_block")
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "dataset": dataset,
            "damp_percent": float(damp),
            "desc_act": desc_act,
            "act_group_aware": gar,
            "sym": config_bool(qc, "sym", True),
            "true_sequential": config_bool(qc, "true_sequential", True),
            "static_groups": config_bool(qc, "static_groups", False),
            "format": fmt.lower(),
            "model_seqlen": seqlen,
            "batch_size": batch_size,
            "nsamples": nsamples,
            "seed": seed,
            "modules_in_block_to_quantize": mib,
            "block_name_to_quantize": qc.get("block_name_to_quantize"),
            "module_name_preceding_first_block": mp,
            "cache_block_outputs": config_bool(qc, "cache_block_outputs", True),
        }

    def stages(self, quantization_config: dict[str, Any]) -> list[str]:
        return ["calibrate", "quantize"]

    def calibration(self, ctx: EngineContext, seqlen: int) -> CalibrationSet:
        """Token windows from `dataset`, tokenized with the source's tokenizer."""
        from transformers import AutoTokenizer

        cfg = ctx.quantization_config
        tok = AutoTokenizer.from_pretrained(str(ctx.source_dir), trust_remote_code=ctx.options.allow_remote_code)
        return load_calibration(cfg["dataset"], tok, nsamples=cfg["nsamples"], seqlen=seqlen, seed=cfg["seed"],
                                allowed_roots=ctx.options.allowed_roots)

    # -- work --------------------------------------------------------------------------------------------
    def _dtypes(self, ctx: EngineContext) -> tuple[torch.dtype, torch.device]:
        if ctx.device.type == "cuda":
            src = str(ctx.config.get("torch_dtype") or ctx.config.get("dtype") or "float16")
            return (torch.bfloat16 if "bfloat16" in src else torch.float16), ctx.device
        return torch.float32, ctx.device

    def quantize(self, ctx: EngineContext) -> MethodResult:
        cfg = ctx.quantization_config
        rep = ctx.reporter
        layout = ctx.layout
        dtype, device = self._dtypes(ctx)
        bits, gs, fmt = cfg["bits"], cfg["group_size"], cfg["format"]
        notes: list[str] = []

        def note(msg: str, level: str = "info", **data: Any) -> None:
            notes.append(msg)
            rep.log(msg, level=level, data=data or None)

        # ---- calibrate
        timings: dict[str, float] = {}
        clock = _Timer(device, timings)
        seqlen = cfg["model_seqlen"] or default_seqlen(ctx.config)
        with clock("calibration data"):
            calib = self.calibration(ctx, seqlen)
        calib_info = calib.describe()
        rep.log(f"calibration: {calib.nsamples} samples x {calib.seqlen} tokens from {calib.source}", data=calib_info)
        rep.progress(1, 2, message="calibration data tokenized")
        cache_outputs = cfg["cache_block_outputs"]
        layer_types = getattr(layout.hf_config.get_text_config(), "layer_types", None)
        if cache_outputs and isinstance(layer_types, (list, tuple)) and len(set(layer_types)) > 1:
            note(f"blocks of different types ({', '.join(sorted(set(map(str, layer_types))))}) all calibrated with "
                 "the first block's mask and position inputs; cache_block_outputs=false gives each block its own",
                 level="warning")
        if not cache_outputs:
            note("cache_block_outputs=false: each block's inputs are recomputed from the embeddings through the "
                 "quantized blocks before it (n(n+1)/2 block forwards; quantized blocks kept in memory)")
        bs = cfg["batch_size"]
        batches = [calib.input_ids[i : i + bs] for i in range(0, calib.nsamples, bs)]
        hidden_size = int(getattr(layout.hf_config.get_text_config(), "hidden_size", 0) or 0)
        act_bytes = calib.tokens * max(hidden_size, 1) * torch.finfo(dtype).bits // 8
        store = device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if 2 * act_bytes > 0.4 * free:
                store = torch.device("cpu")
                note(f"calibration activations ({act_bytes / 2**30:.1f} GiB) kept on the CPU")
        meta = build_meta_model(layout.hf_config, allow_remote_code=ctx.options.allow_remote_code)
        pre = ctx.reader.load_many(layout.pre_tensors)
        with clock("capture first-block inputs"):
            capture = BlockInputCapture(meta, layout.block_name, pre, device=device, dtype=dtype)
            blocks = capture.blocks
            hidden, rest = capture.capture(batches, [], 0, store)
        rep.progress(2, 2, message="first-block inputs captured")
        for name, t in pre.items():
            ctx.writer.add(name, _fp16(t))
        del meta, pre
        if cache_outputs:
            del capture
        done_blocks: list[torch.nn.Module] = []  # quantized blocks, kept only when cache_block_outputs=false

        # ---- quantize
        rep.stage("quantize", total=layout.num_blocks)
        n = layout.num_blocks
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        errors: dict[str, float] = {}
        groups_spec: list[list[str]] | None = None
        quantized_rel: list[list[str]] | None = None
        t_start = time.monotonic()
        for bi, binfo in enumerate(layout.blocks):
            rep.check_cancelled()
            prefix = binfo.prefix
            rel = {li.name[len(prefix) + 1 :]: li for li in binfo.linears}
            if not cache_outputs and bi > 0:
                with clock("recompute block inputs"):
                    hidden, rest = capture.capture(batches, done_blocks, binfo.index, store)
            with clock("load block"):
                tensors = ctx.reader.load_prefix(prefix)
                block = materialize_block(blocks[binfo.index], {k[len(prefix) + 1 :]: v for k, v in tensors.items()},
                                          device, dtype)
            runner = BlockRunner(block, hidden, rest, device)
            if groups_spec is None:
                classes = discover_input_groups(block, list(rel), hidden[0], rest[0][0], rest[0][1], device)
                groups_spec = self._plan(cfg, classes, rel)
                for li in rel.values():
                    why = unsupported_reason(li.in_features, li.out_features, bits, gs)
                    if why:
                        skipped[li.name[len(prefix) + 1 :]] = why
                    elif cfg["modules_in_block_to_quantize"] and not any(
                        li.name[len(prefix) + 1 :] in g for g in cfg["modules_in_block_to_quantize"]):
                        skipped[li.name[len(prefix) + 1 :]] = "not listed in modules_in_block_to_quantize"
                for r, why in skipped.items():
                    note(f"{layout.block_name}.*.{r} kept in float16: {why}", level="warning", module=r)
                quantized_rel = [[m for cls in g for m in cls if m not in skipped] for g in groups_spec]
                quantized_rel = [g for g in quantized_rel if g]
            written: set[str] = set()
            block_metrics: dict[str, Any] = {}
            for group in groups_spec:  # list of input classes, each a list of names
                classes = [[m for m in cls if m not in skipped] for cls in group]
                classes = [c for c in classes if c]
                if not classes:
                    continue
                rep.check_cancelled()
                with clock("forward + Hessians"):
                    hess = runner.collect(classes)
                for cls in classes:
                    H = hess.pop(cls[0])
                    for r in cls:
                        li = rel[r]
                        mod = block.get_submodule(r)
                        W = mod.weight.data.t() if li.transposed else mod.weight.data
                        with clock("gptq"):
                            res = gptq_quantize(
                                W, H, bits=bits, group_size=gs, sym=cfg["sym"], damp_percent=cfg["damp_percent"],
                                desc_act=cfg["desc_act"], act_group_aware=cfg["act_group_aware"],
                                static_groups=cfg["static_groups"],
                                log=lambda m, r=r: note(f"{prefix}.{r}: {m}", level="warning"),
                            )
                        clock.start("pack + write")
                        if res.dead_columns:
                            rep.log(f"{prefix}.{r}: {res.dead_columns} input channels never active (zeroed)",
                                    data={"module": f"{prefix}.{r}", "dead_columns": res.dead_columns})
                        err = relative_error(W, res.Q)
                        sq = _sq_error(W, res.Q, H)
                        errors[li.name] = err
                        block_metrics[li.name] = {"rel_error": err, "sq_error": sq, "gptq_loss": res.loss,
                                                  "damp_percent": res.damp_percent}
                        rep.progress(bi, n, message=f"block {bi + 1}/{n}: {r}",
                                     metrics={"layer": li.name, "block": binfo.index, "rel_error": err,
                                              "sq_error": sq, "gptq_loss": res.loss,
                                              "damp_percent": res.damp_percent, "columns": li.in_features})
                        bias = mod.bias.data if li.has_bias and mod.bias is not None else None
                        for suffix, t in pack_layer(res, fmt=fmt, bias=bias).items():
                            ctx.writer.add(f"{li.name}.{suffix}", t)
                        written.update({li.weight_name, li.bias_name})
                        with torch.no_grad():
                            q = res.Q.t() if li.transposed else res.Q
                            mod.weight.data.copy_(q.to(mod.weight.dtype))
                        quantized.append(li.name)
                        clock.stop("pack + write")
                        del res
                    del H
                del hess
            if bi + 1 < n and cache_outputs:
                with clock("forward quantized block"):
                    hidden = runner.forward_all()
                    runner.hidden = hidden
            with clock("pack + write"):
                for name, t in tensors.items():
                    if name not in written:
                        ctx.writer.add(name, _fp16(t))
            if not cache_outputs and bi + 1 < n:
                done_blocks.append(block)
            else:
                block.to("meta")
            del tensors, runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rep.progress(bi + 1, n, message=f"quantizing block {bi + 1}/{n}", metrics={"layers": block_metrics})
        del hidden, rest, done_blocks
        # ---- after the blocks
        post = ctx.reader.load_many(layout.post_tensors)
        for name, t in post.items():
            ctx.writer.add(name, _fp16(t))

        skipped_full = [f"{b.prefix}.{r}" for b in layout.blocks for r in skipped]
        outside = [li.name for li in layout.outside_linears]
        qconf = build_quantization_config(
            cfg, block_name=layout.block_name, quantized_in_block=quantized_rel or [],
            skipped_modules=skipped_full, calibration=calib_info, quantizer_version=_version(),
        )
        if gs != -1:
            qset = set(quantized)
            partial = sorted({li.in_features for li in layout.all_linears() if li.name in qset and li.in_features % gs})
            if partial:
                note(f"in_features {partial} are not multiples of group_size {gs}: the last group is partial "
                     "(GPTQModel and transformers load it; vLLM's GPTQ kernels need whole groups)")
        ctx.state["gptq"] = {"bits": bits, "format": fmt, "quantized": quantized,
                             "seconds": time.monotonic() - t_start, "timings": timings}
        return MethodResult(
            quantization_config=qconf,
            skipped_modules=skipped_full + outside,
            quantized_modules=quantized,
            layer_errors=errors,
            config_updates={"torch_dtype": "float16", "dtype": "float16"},
            extra_json_files={"quantize_config.json": qconf},
            notes=notes,
        )

    def _plan(self, cfg: dict[str, Any], classes: list[list[str]], rel: dict[str, Any]) -> list[list[list[str]]]:
        """Sequential groups, each a list of input classes (layers that share one Hessian)."""
        mib = cfg["modules_in_block_to_quantize"]
        if mib:
            known = set(rel)
            for g in mib:
                for m in g:
                    if m not in known:
                        raise InvalidConfig(f"modules_in_block_to_quantize names {m!r}, which is not a Linear layer "
                                            f"of the block (layers: {', '.join(sorted(known))})",
                                            field="modules_in_block_to_quantize")
            out = []
            for g in mib:
                out.append([[m for m in cls if m in g] for cls in classes if any(m in g for m in cls)])
            return out
        if cfg["true_sequential"]:
            return [[cls] for cls in classes]
        return [classes]

    # -- evaluation ----------------------------------------------------------------------------------------
    def load_for_evaluation(self, ctx: EngineContext, out_dir: Path) -> tuple[torch.nn.Module, str]:
        """The saved checkpoint dequantized into the original architecture (GPTQ kernels need optimum or
        GPTQModel, which the engine does not depend on)."""
        info = ctx.state.get("gptq") or {}
        bits = info.get("bits", ctx.quantization_config["bits"])
        fmt = info.get("format", ctx.quantization_config["format"])

        def replace(model: torch.nn.Module) -> None:
            load_saved_weights(model, out_dir, bits=bits, fmt=fmt)

        model = load_with_replaced_weights(ctx.source_dir, replace, device=ctx.device,
                                           allow_remote_code=ctx.options.allow_remote_code)
        return model, "dequantized GPTQ weights in the original architecture"


class _Timer:
    """Wall time per phase (synchronizing CUDA at the boundaries so that each phase gets its own time)."""

    def __init__(self, device: torch.device, into: dict[str, float]) -> None:
        self.device, self.into, self._t = device, into, {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, name: str) -> None:
        self._sync()
        self._t[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._sync()
        self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - self._t.pop(name)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                timer.start(name)

            def __exit__(self_inner, *exc):
                timer.stop(name)

        return _Ctx()


def _sq_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared error of the layer's outputs on the calibration inputs.

    A progress figure: on CUDA the [out, in] x [in, in] product may run on TF32 tensor cores (precise enough
    for a chart, several times cheaper than float32 for the largest layers)."""
    D = W.float() - Q.to(W.device, torch.float32)
    if not D.is_cuda:
        return float(((D @ H.float()) * D).sum())
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return float(((D @ H.float()) * D).sum())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16) if t.is_floating_point() else t


@torch.no_grad()
def load_saved_weights(model: torch.nn.Module, out_dir: Path, *, bits: int, fmt: str) -> list[str]:
    """Copy every tensor of a saved GPTQ checkpoint into `model`, dequantizing quantized layers.

    Returns the names of the dequantized modules.
    """
    from ..checkpoint import CheckpointReader

    from transformers.pytorch_utils import Conv1D

    reader = CheckpointReader(out_dir)
    state = model.state_dict()
    modules = dict(model.named_modules())
    names = reader.names()
    qmods = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
    for m in qmods:
        t = {s: reader.load(f"{m}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        w = dequantize_layer(t, bits, fmt=fmt)
        target = state[m + ".weight"]
        if isinstance(modules.get(m), Conv1D):  # GPT-2's Conv1D holds [in, out]; the checkpoint is Linear-oriented
            w = w.t()
        target.copy_(w.to(target.dtype))
    for n in names:
        if n.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            continue
        if n in state:
            state[n].copy_(reader.load(n).to(state[n].dtype))
    reader.close()
    return qmods
