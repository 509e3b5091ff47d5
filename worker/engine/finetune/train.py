"""The training loop: micro-batches, gradient accumulation, clipping, the scheduler, evaluation points,
progress events and checkpoints.

An optimizer step is `gradient_accumulation_steps` micro-batches; the loss reported for a step is the
token-weighted mean over its micro-batches. The batches of every epoch come in a seeded order that depends
only on (seed, epoch) (`data.epoch_batches`), so a run resumed from the checkpoint of step N goes on with
exactly the batches the lost run would have seen.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .data import Batch, epoch_batches


@dataclass
class LoopState:
    step: int = 0
    #: [step, loss, learning rate] of every optimizer step.
    losses: list[list[float]] = field(default_factory=list)
    #: [step, eval loss] of every evaluation point (step 0 = before training).
    evals: list[list[float]] = field(default_factory=list)
    tokens: int = 0
    resumed_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": self.losses, "evals": self.evals, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        return cls(step=int(d["step"]), losses=list(d["losses"]), evals=list(d["evals"]), tokens=int(d["tokens"]))


def memory_bytes(device: torch.device) -> int:
    """The GPU's peak allocation on CUDA, the process's peak resident memory elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, reporter: Any) -> float:
    """Mean next-token NLL over every target token of the batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        reporter.check_cancelled()
        b = b.to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
        targets = b.labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((targets != -100).sum())
    if was_training:
        model.train()
    return total / max(count, 1)


def _step_loss(model: torch.nn.Module, b: Batch) -> tuple[torch.Tensor, int]:
    """(summed NLL of the micro-batch's targets, their count): summing keeps the step's loss a mean over
    tokens however the micro-batches are padded."""
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits.float()
    targets = b.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, int((targets != -100).sum())


def total_steps(training: dict[str, Any], micro_batches_per_epoch: int) -> int:
    if training["max_steps"] != -1:
        return int(training["max_steps"])
    per_epoch = math.ceil(micro_batches_per_epoch / training["gradient_accumulation_steps"])
    return max(1, math.ceil(per_epoch * training["num_train_epochs"]))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the adapters' matmuls when the base computes in 16-bit on a GPU (what Trainer's
    bf16/fp16 arguments do); a no-op context otherwise."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def run(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, train_seqs: list[list[int]],
        eval_batches: list[Batch], training: dict[str, Any], steps: int, pad_id: int, device: torch.device,
        reporter: Any, checkpoint_dir: Path | None, resume: Path | None,
        compute_dtype: torch.dtype | None = None) -> LoopState:
    accum = training["gradient_accumulation_steps"]
    bs = training["per_device_train_batch_size"]
    seed = training["seed"]
    params = [p for p in model.parameters() if p.requires_grad]
    state = LoopState()
    if resume is not None:
        saved = checkpoint.load(resume, model, optimizer, scheduler)
        state = LoopState.from_dict(saved["loop"])
        state.resumed_from = state.step
        reporter.log(f"resumed from the checkpoint of step {state.step}", data={"step": state.step})
    elif eval_batches:
        torch.manual_seed(seed)
        before = eval_loss(model, eval_batches, device, reporter)
        state.evals.append([0, before])
        reporter.progress(0, steps, message=f"step 0/{steps}: eval loss {before:.4f}",
                          metrics={"step": 0, "eval_loss": before, "eval_ppl": math.exp(min(before, 50))})
    else:  # no evaluation asked for
        torch.manual_seed(seed)
        reporter.progress(0, steps, message=f"step 0/{steps}", metrics={"step": 0})

    # Where the resumed run is in the data: which epoch, which micro-batch of it.
    epoch_len = math.ceil(len(train_seqs) / bs)
    micro = state.step * accum
    epoch, offset = divmod(micro, epoch_len)
    batches = epoch_batches(train_seqs, bs, seed, epoch, pad_id)

    model.train()
    window_t0, window_tokens = time.perf_counter(), 0
    started = time.perf_counter()
    first_step = state.step
    while state.step < steps:
        reporter.check_cancelled()
        step_nll, step_count = 0.0, 0
        parts: list[tuple[Batch, int]] = []
        for _ in range(accum):
            if offset >= len(batches):
                epoch, offset = epoch + 1, 0
                batches = epoch_batches(train_seqs, bs, seed, epoch, pad_id)
            b = batches[offset].to(device)
            offset += 1
            parts.append((b, int((b.labels[:, 1:] != -100).sum())))
        denom = max(1, sum(n for _, n in parts))
        for b, _ in parts:
            with autocast(device, compute_dtype):
                nll, count = _step_loss(model, b)
            (nll / denom).backward()
            step_nll += float(nll.detach())
            step_count += count
            window_tokens += b.tokens
        grad_norm = None
        if training["max_grad_norm"] > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, training["max_grad_norm"]))
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        loss = step_nll / max(step_count, 1)
        state.losses.append([state.step, loss, lr])
        state.tokens += sum(b.tokens for b, _ in parts)

        evaluated = None
        if eval_batches and training["eval_steps"] and state.step % training["eval_steps"] == 0 and state.step < steps:
            evaluated = eval_loss(model, eval_batches, device, reporter)
            state.evals.append([state.step, evaluated])
        if state.step % training["logging_steps"] == 0 or state.step == steps or evaluated is not None:
            now = time.perf_counter()
            rate = window_tokens / max(now - window_t0, 1e-9)
            per_step = (now - started) / max(state.step - first_step, 1)
            metrics = {"step": state.step, "loss": loss, "lr": lr, "tokens_per_s": rate,
                       "memory_bytes": memory_bytes(device), "eta_s": per_step * (steps - state.step),
                       "epoch": epoch + offset / max(len(batches), 1)}
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm
            if evaluated is not None:
                metrics["eval_loss"] = evaluated
            reporter.progress(state.step, steps, message=f"step {state.step}/{steps}: loss {loss:.4f}",
                              metrics=metrics)
            window_t0, window_tokens = now, 0
        if checkpoint_dir is not None and (state.step % training["save_steps"] == 0) and state.step < steps:
            checkpoint.save(checkpoint_dir, state.step, model, optimizer, scheduler, state.to_dict())
    return state
