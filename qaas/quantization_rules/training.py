"""A fine-tuning job's `training`: the field names of transformers' `TrainingArguments` that a QLoRA run
uses, plus `max_seq_length`, `packing` and `assistant_only_loss` (TRL's `SFTConfig` names).

What is not listed is refused by name (a `TrainingArguments.to_dict()` carries dozens of fields about output
directories, hubs and distributed launchers that the service decides itself). Combinations that cannot both
hold are refused here; what depends on the worker's device (paged optimizers need CUDA) is `check_device`.
"""

from __future__ import annotations

from typing import Any

from .fields import Boolean, Choice, FieldError, Integer, Number, ObjectRules

#: Optimizers offered: torch's AdamW, bitsandbytes' 8-bit AdamW, and its paged variants (optimizer state in
#: CUDA unified memory, so that a memory spike pages it out to the host instead of failing).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit", "sgd")
PAGED = ("paged_adamw_8bit", "paged_adamw_32bit")
#: "auto": paged_adamw_8bit on a CUDA worker (the QLoRA recipe), adamw_torch on a CPU worker; the result
#: says which was used.
AUTO_OPTIM = "auto"
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


def _combine(c: dict[str, Any]) -> dict[str, Any]:
    if c["warmup_steps"] and c["warmup_ratio"]:
        raise FieldError("warmup_steps", "give warmup_steps or warmup_ratio, not both")
    if c["max_steps"] == -1 and c["num_train_epochs"] is None:
        c["num_train_epochs"] = 1.0
    if c["max_steps"] != -1 and c["save_steps"] > c["max_steps"]:
        c["save_steps"] = c["max_steps"]
    if c["lr_scheduler_type"] in ("constant",) and (c["warmup_steps"] or c["warmup_ratio"]):
        raise FieldError("lr_scheduler_type", "'constant' has no warmup; use 'constant_with_warmup'")
    return c


_SERVICE = "is decided by the service"

RULES = ObjectRules(
    title="TrainingArguments",
    fields={
        "learning_rate": Number(2e-4, minimum=0.0, maximum=1.0, exclusive=True),
        "num_train_epochs": Number(None, minimum=0.0, maximum=1000.0, exclusive=True,
                                   description="default 1 when max_steps is -1"),
        "max_steps": Integer(-1, minimum=1, maximum=10_000_000, also=(-1,), description="-1: num_train_epochs"),
        "per_device_train_batch_size": Integer(4, minimum=1, maximum=1024),
        "per_device_eval_batch_size": Integer(4, minimum=1, maximum=1024),
        "gradient_accumulation_steps": Integer(1, minimum=1, maximum=4096),
        "warmup_steps": Integer(0, minimum=0, maximum=10_000_000),
        "warmup_ratio": Number(0.0, minimum=0.0, maximum=1.0),
        "lr_scheduler_type": Choice("linear", choices=SCHEDULERS),
        "weight_decay": Number(0.0, minimum=0.0, maximum=10.0),
        "max_grad_norm": Number(1.0, minimum=0.0, maximum=1e6, description="0: no clipping"),
        "gradient_checkpointing": Boolean(True, description="recompute activations in the backward pass"),
        "optim": Choice(AUTO_OPTIM, choices=(AUTO_OPTIM, *OPTIMIZERS)),
        "seed": Integer(42, minimum=0, maximum=2**32 - 1),
        "logging_steps": Integer(10, minimum=1, maximum=1_000_000, description="a progress event every N steps"),
        "eval_steps": Integer(None, minimum=1, maximum=1_000_000,
                              description="held-out loss every N steps (default: before and after training only)"),
        "save_steps": Integer(50, minimum=1, maximum=1_000_000,
                              description="adapter checkpoint every N steps; a retried attempt resumes from it"),
        "max_seq_length": Integer(512, minimum=8, maximum=131_072, description="tokens per training sequence"),
        "packing": Boolean(False, description="concatenate examples into full max_seq_length sequences"),
        "assistant_only_loss": Boolean(False, description="chat conversations: the loss covers only the assistant "
                                                          "turns (TRL's SFTConfig name)"),
    },
    refused={
        **{k: _SERVICE for k in ("output_dir", "logging_dir", "overwrite_output_dir", "report_to", "run_name",
                                 "push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "local_rank",
                                 "ddp_backend", "deepspeed", "fsdp", "fsdp_config", "use_cpu", "no_cuda",
                                 "save_total_limit", "save_strategy", "logging_strategy", "eval_strategy",
                                 "evaluation_strategy", "dataloader_num_workers", "resume_from_checkpoint")},
        "bf16": "the compute dtype is quantization_config.bnb_4bit_compute_dtype",
        "fp16": "the compute dtype is quantization_config.bnb_4bit_compute_dtype",
        "tf32": "decided by the service",
        "gradient_checkpointing_kwargs": "the service checkpoints without reentrancy (use_reentrant=false)",
    },
    combine=_combine,
)


def normalize(value: Any) -> dict[str, Any]:
    return RULES.normalize(value, "training")


def device_problem(training: dict[str, Any], device: str) -> str | None:
    """Why the normalized `training` cannot run on a worker whose device is `device` ("cpu", "cuda...",
    "auto"), or None. Paged optimizers live in CUDA unified memory: a CPU worker refuses them rather than
    quietly running another optimizer."""
    if training["optim"] in PAGED and device == "cpu":
        return (f"{training['optim']} pages optimizer state through CUDA unified memory and this server's workers "
                "run on the CPU; use adamw_torch (or optim 'auto')")
    return None
