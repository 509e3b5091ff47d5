"""One fine-tuning job end to end: resolve -> load (4-bit) -> prepare (k-bit preparation, adapters) -> train
-> evaluate -> export.

`finetune()` is the entry point the runner calls for a spec with `"kind": "finetune"`. It checks the request
with the same rules as the API (`qaas.quantization_rules.lora` / `training` / `finetune`), trains LoRA
adapters on the frozen 4-bit base, checkpoints every `save_steps` into `checkpoint_dir` (and resumes from
`resume_dir` when a lost attempt left one), and writes the adapter as peft saves it
(`adapter_model.safetensors` + `adapter_config.json`, which `peft.PeftModel.from_pretrained(base, dir)`
loads) into a staging directory renamed into place on success.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from qaas.quantization_rules import InvalidQuantizationConfig
from qaas.quantization_rules import lora as lora_rules
from qaas.quantization_rules import training as training_rules

from ..errors import EngineError, InvalidConfig
from ..export import StagedOutput, carry_over_files, list_files, write_json
from ..options import EngineOptions
from ..pipeline import _StageClock
from ..progress import ForwardingReporter, NullReporter, Reporter
from ..source import resolve_source
from ..version import package_version
from . import checkpoint, data, merge, model as base_model, train

#: Tokens of the probe whose final logits the result reports (a consumer reproduces them from the files).
PROBE_TOKENS = 16
PROBE_TOP = 32
#: The full-precision base is evaluated too when its weights take at most this many bytes.
FULL_PRECISION_EVAL_MAX_BYTES = 4 * 10**9


def _rules(lora: Any, training: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        return lora_rules.normalize(lora), training_rules.normalize(training)
    except InvalidQuantizationConfig as exc:
        raise InvalidConfig(exc.message, field=exc.field) from None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def finetune(spec: dict[str, Any], *, options: EngineOptions, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the fine-tuning job described by `spec` (see the runner); returns the result."""
    clock = _StageClock(reporter or NullReporter())
    lora, training = _rules(spec.get("lora"), spec.get("training"))
    device = torch.device(options.resolved_device())
    if device.type == "cuda":
        torch.cuda.init()
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
    problem = training_rules.device_problem(training, device.type)
    if problem:
        raise InvalidConfig(problem, field="training.optim")
    sources = options.calibration_sources()
    checkpoint_dir = Path(spec["checkpoint_dir"]) if spec.get("checkpoint_dir") else None
    resume = checkpoint.latest(Path(spec["resume_dir"])) if spec.get("resume_dir") else None
    if resume is None:
        resume = checkpoint.latest(checkpoint_dir)

    staged = StagedOutput(spec["out_dir"])
    try:
        clock.stage("resolve", message=str(spec["source"].get("id") or spec["source"].get("path") or ""))
        resolved = resolve_source(spec["source"], options)
        clock.log("source resolved", data=resolved.describe())
        train_examples = data.load_examples(spec.get("dataset"), sources, "dataset")
        if not options.evaluate:  # options.evaluate false: nothing held out, no evaluation passes
            eval_examples, held_out = [], "not evaluated (options.evaluate is false)"
        elif spec.get("eval_dataset") is not None:
            eval_examples = data.load_examples(spec["eval_dataset"], sources, "eval_dataset")
            held_out = "eval_dataset"
        else:
            train_examples, eval_examples, held_out = data.split_held_out(train_examples, training["seed"])

        clock.stage("load")
        from transformers import AutoTokenizer, get_scheduler

        tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=options.allow_remote_code)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        msl, packing = training["max_seq_length"], training["packing"]
        masked = training["assistant_only_loss"]
        train_seqs = data.tokenize(tokenizer, train_examples, max_seq_length=msl, packing=packing, name="dataset",
                                   assistant_only_loss=masked)
        eval_seqs = data.tokenize(tokenizer, eval_examples, max_seq_length=msl, packing=packing,
                                  name="eval_dataset" if held_out == "eval_dataset" else "dataset",
                                  assistant_only_loss=masked) if eval_examples else []
        eval_batches = [data.collate(eval_seqs[i:i + training["per_device_eval_batch_size"]], pad_id)
                        for i in range(0, len(eval_seqs), training["per_device_eval_batch_size"])]
        used_qc, prequantized = base_model.base_config(spec.get("quantization_config"), resolved.path, device)
        net = base_model.load_base(resolved.path, used_qc, prequantized, device,
                                   allow_remote_code=options.allow_remote_code)
        clock.log("base loaded in 4-bit", data={"memory_bytes": train.memory_bytes(device),
                                               "footprint_bytes": int(net.get_memory_footprint())})
        base_footprint = int(net.get_memory_footprint())

        clock.stage("prepare")
        net = base_model.add_adapters(net, lora, gradient_checkpointing=training["gradient_checkpointing"])
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        total_params = sum(p.numel() for p in net.parameters())
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer, optim_used = base_model.make_optimizer(training["optim"], params, lr=training["learning_rate"],
                                                          weight_decay=training["weight_decay"], device=device)
        steps = train.total_steps(training, math.ceil(len(train_seqs) / training["per_device_train_batch_size"]))
        warmup = training["warmup_steps"] or math.ceil(training["warmup_ratio"] * steps)
        scheduler = get_scheduler(training["lr_scheduler_type"], optimizer, num_warmup_steps=warmup,
                                  num_training_steps=steps)
        clock.log(f"{trainable} trainable parameters of {total_params}; {steps} steps with {optim_used}",
                  data={"trainable": trainable, "total": total_params, "steps": steps, "optim": optim_used})

        clock.stage("train", total=steps)
        state = train.run(net, optimizer, scheduler, train_seqs=train_seqs, eval_batches=eval_batches,
                          training=training, steps=steps, pad_id=pad_id, device=device, reporter=clock,
                          checkpoint_dir=checkpoint_dir, resume=resume,
                          compute_dtype=base_model.DTYPES.get(used_qc.get("bnb_4bit_compute_dtype")))

        clock.stage("evaluate")
        probe = _probe(net, (eval_seqs or train_seqs)[0], device)
        if eval_batches:
            evaluation = _evaluation(net, state, eval_batches, eval_seqs, held_out, resolved.path, prequantized,
                                     device, clock, options)
        else:
            evaluation = {"skipped": "options.evaluate is false"}

        clock.stage("export")
        net.save_pretrained(str(staged.path), safe_serialization=True)
        _name_base(staged.path, spec.get("base_name") or resolved.describe().get("id") or resolved.path.name)
        carried = carry_over_files(resolved.path, staged.path)
        curve = {"losses": state.losses, "evals": state.evals}
        write_json(staged.path / "training_log.json", curve)
        files = list_files(staged.path)

        merged = None
        if spec.get("merge"):
            clock.stage("merge")
            merged = _merge_output(net, lora, spec["merge"], resolved.path, staged.path,
                                   Path(spec["out_dir"]).parent / ".merged-float", probe, eval_batches, evaluation,
                                   device, clock, options)
            files += [{**f, "name": f"{merge.MERGED_FOLDER}/{f['name']}"} for f in merged.pop("files")]
        clock.check_cancelled()
        staged.commit()
        clock._close()
    except BaseException:
        staged.abort()
        raise

    losses = [loss for _, loss, _ in state.losses]
    return {
        "kind": "finetune",
        "engine_version": f"qaas {package_version()}",
        "method": "qlora",
        "out_dir": str(staged.final_dir),
        "files": files,
        "source": resolved.describe(),
        "base_model": spec.get("base_name") or resolved.describe().get("id") or resolved.path.name,
        "quantization_config": used_qc,
        "base_prequantized": prequantized,
        "base_footprint_bytes": base_footprint,
        "lora": {**lora, "trainable_parameters": trainable, "total_parameters": total_params},
        "training": {**training, "optim": optim_used, "requested_optim": training["optim"], "total_steps": steps,
                     "warmup_steps": warmup},
        "data": {"train_examples": len(train_examples), "train_sequences": len(train_seqs),
                 "eval_examples": len(eval_examples), "held_out": held_out,
                 "dataset_sha256": data.fingerprint(spec.get("dataset")),
                 "eval_dataset_sha256": data.fingerprint(spec["eval_dataset"]) if spec.get("eval_dataset") else None,
                 "tokens_trained": state.tokens},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "min": min(losses) if losses else None,
                 "mean_first_10pct": _mean(losses[: max(1, len(losses) // 10)]),
                 "mean_last_10pct": _mean(losses[-max(1, len(losses) // 10):]),
                 "curve": _thin(state.losses, 200), "evals": state.evals},
        "resumed_from_step": state.resumed_from,
        "evaluation": evaluation,
        "probe": probe,
        "merged": merged,
        "carried_over_files": carried,
        "timings": dict(clock.timings),
        "device": str(device),
        "gpu_peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _merge_output(net: torch.nn.Module, lora: dict[str, Any], merge_spec: dict[str, Any], source_dir: Path,
                  out_dir: Path, float_dir: Path, probe: dict[str, Any], eval_batches: list[Any],
                  evaluation: dict[str, Any], device: torch.device, clock: Any,
                  options: EngineOptions) -> dict[str, Any]:
    """The second output (`merge`): the trained adapter merged into the de-quantized base, written as a float
    checkpoint in `float_dir`, checked there (the probe's logits, the held-out loss), and re-quantized by the
    quantization pipeline into `out_dir/merged` (module `merge`). Returns its part of the result."""
    from ..pipeline import quantize

    try:
        written = merge.write_float_checkpoint(net, source_dir, float_dir, use_rslora=bool(lora["use_rslora"]),
                                               max_shard_size=options.max_shard_size_bytes)
        clock.log(f"adapter merged into the de-quantized base: {written.merged_layers} layers, "
                  f"{written.tensors} tensors in {written.dtype}",
                  data={"merged_layers": written.merged_layers, "dtype": written.dtype})
        clock.check_cancelled()
        float_model = _float_check(float_dir, probe, eval_batches, device, clock, options)
        clock.check_cancelled()
        # the merged checkpoint is read from the attempt's own directory, like any local source
        inner = dataclasses.replace(options, allowed_roots=(*options.allowed_roots, str(float_dir.parent)),
                                    targets=(), cpu_compatible=False)
        try:
            quantized = quantize({"path": str(float_dir)}, merge_spec["quantization_config"],
                                 out_dir / merge.MERGED_FOLDER, options=inner, reporter=_Prefixed(clock, "merge "))
        except EngineError as exc:  # a field of the merge's config is named where the request has it
            if exc.field and not exc.field.startswith(("merge", "source", "model")):
                exc.field = f"merge.quantization_config.{exc.field}"
            exc.message = f"merge: {exc.message}"
            exc.args = (exc.message,)
            raise
    finally:
        shutil.rmtree(float_dir, ignore_errors=True)
    kept = ("method", "quantization_config", "size_before_bytes", "size_after_bytes", "compression_ratio",
            "skipped_modules", "calibration", "quantized_modules", "layer_errors", "evaluation", "notes",
            "gptq", "bitsandbytes", "timings")
    return {"folder": merge.MERGED_FOLDER, "files": quantized["files"],
            "merged_layers": written.merged_layers, "float_dtype": written.dtype,
            "untied_embeddings": written.untied, "float_model": float_model,
            "adapter_perplexity_after": evaluation.get("perplexity_after"),
            **{k: quantized[k] for k in kept if k in quantized}}


@torch.no_grad()
def _float_check(float_dir: Path, probe: dict[str, Any], eval_batches: list[Any], device: torch.device,
                 clock: Any, options: EngineOptions) -> dict[str, Any]:
    """The merged float model loaded back by transformers from the files written: its logits on the adapter's
    probe (a consumer compares them with peft's merge_and_unload on the de-quantized base) and its held-out
    loss, which equals the adapter's on its 4-bit base up to rounding (the same function, merged). Skipped,
    saying so, when the weights exceed FULL_PRECISION_EVAL_MAX_BYTES."""
    size = sum(p.stat().st_size for p in float_dir.glob("*.safetensors"))
    if size > FULL_PRECISION_EVAL_MAX_BYTES:
        return {"skipped": f"{size} bytes of merged float weights: not loaded for the check"}
    from transformers import AutoModelForCausalLM

    # float32 on the CPU (its 16-bit matmuls are slow and round more), the stored dtype on a GPU
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32 if device.type == "cpu" else "auto",
                                                 device_map={"": str(device)}, use_safetensors=True,
                                                 trust_remote_code=options.allow_remote_code)
    try:
        model.eval()
        ids = torch.tensor([probe["input_ids"]], dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
        out: dict[str, Any] = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                               "probe_logits": logits[torch.tensor(probe["top_indices"])].tolist()}
        if eval_batches:
            loss = train.eval_loss(model, eval_batches, device, clock)
            out.update(eval_loss=loss, perplexity=math.exp(min(loss, 50)))
        return out
    finally:
        del model
        _free(device)


class _Prefixed(ForwardingReporter):
    """The merge's quantization pipeline reporting through the job's reporter: its stages named
    "merge <stage>", so the job's timeline and timings keep the adapter's stages apart from the merge's."""

    def __init__(self, inner: Any, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self.inner.stage(self.prefix + name, total=total, message=message)


def _evaluation(net: torch.nn.Module, state: Any, eval_batches: list[Any], eval_seqs: list[Any], held_out: str,
                source_dir: Path, prequantized: bool, device: torch.device, clock: Any,
                options: EngineOptions) -> dict[str, Any]:
    """Held-out loss and perplexity after training (before: the loop's step-0 point), and the unquantized
    base's when it fits."""
    after = train.eval_loss(net, eval_batches, device, clock)
    state.evals.append([state.step, after])
    before = state.evals[0][1]
    full = _full_precision_loss(source_dir, eval_batches, device, clock, options) if not prequantized else None
    evaluation = {"eval_loss_before": before, "eval_loss_after": after,
                  "perplexity_before": math.exp(min(before, 50)), "perplexity_after": math.exp(min(after, 50)),
                  "eval_sequences": len(eval_seqs),
                  "eval_tokens": sum(int((b.labels[:, 1:] != -100).sum()) for b in eval_batches), "held_out": held_out}
    if full is not None:
        evaluation["full_precision_perplexity"] = math.exp(min(full, 50))
    clock.log(f"perplexity {evaluation['perplexity_before']:.4f} -> {evaluation['perplexity_after']:.4f}",
              data={"before": evaluation["perplexity_before"], "after": evaluation["perplexity_after"]})
    return evaluation


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _thin(points: list[list[float]], at_most: int) -> list[list[float]]:
    """At most `at_most` points of the curve, evenly spaced, always with the last."""
    if len(points) <= at_most:
        return points
    stride = math.ceil(len(points) / at_most)
    out = points[::stride]
    return out if out[-1] == points[-1] else out + [points[-1]]


def _name_base(out: Path, name: str) -> None:
    """adapter_config.json names the base by its Hub id (or directory name), never a worker's path."""
    path = out / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = name
    write_json(path, config)


@torch.no_grad()
def _probe(net: torch.nn.Module, seq: list[int], device: torch.device) -> dict[str, Any]:
    """The trained model's logits at the last position of a short probe: the largest PROBE_TOP of them and
    where they are, so that a consumer can check that the saved adapter reproduces the worker's model."""
    net.eval()
    ids = torch.tensor([seq[:PROBE_TOKENS]], dtype=torch.long, device=device)
    logits = net(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
    top = torch.topk(logits, min(PROBE_TOP, logits.numel()))
    return {"input_ids": ids[0].tolist(), "top_indices": top.indices.tolist(), "top_logits": top.values.tolist()}


def _full_precision_loss(source_dir: Path, batches: list[Any], device: torch.device, clock: Any,
                         options: EngineOptions) -> float | None:
    """The unquantized base's eval loss, when its weights fit comfortably; None otherwise."""
    size = sum(p.stat().st_size for p in source_dir.glob("*.safetensors"))
    if size > FULL_PRECISION_EVAL_MAX_BYTES:
        clock.log(f"full-precision base not evaluated: {size} bytes of weights", level="info")
        return None
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    full = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=dtype, device_map={"": str(device)},
                                                use_safetensors=True, trust_remote_code=options.allow_remote_code)
    try:
        return train.eval_loss(full, batches, device, clock)
    finally:
        del full
        _free(device)
