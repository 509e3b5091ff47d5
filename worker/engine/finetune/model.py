"""The 4-bit base and its adapters: load with bitsandbytes, prepare for k-bit training, wrap with peft.

A base that is already a bitsandbytes 4-bit checkpoint (a quantization job's output) is loaded with its own
config; any other is quantized on load with the request's `BitsAndBytesConfig`. Compute dtype "auto" is
bfloat16 on a GPU that has it and float32 elsewhere (the CPU's bfloat16 matmuls are slower than float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qaas.quantization_rules import finetune as finetune_rules
from qaas.quantization_rules.training import PAGED

from ..errors import InvalidConfig, UnsupportedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prequantized_config(source_dir: Path) -> dict[str, Any] | None:
    """The source's own quantization_config when it is a checkpoint quantized ahead of time, else None."""
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    return config.get("quantization_config")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == finetune_rules.COMPUTE_AUTO:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def base_config(request_config: dict[str, Any] | None, source_dir: Path, device: torch.device
                ) -> tuple[dict[str, Any], bool]:
    """(the base's quantization config as used -- compute dtype resolved --, whether it was stored so)."""
    stored = prequantized_config(source_dir)
    if stored is not None:
        if stored.get("quant_method") != "bitsandbytes" or not stored.get("load_in_4bit"):
            raise UnsupportedModel(f"the base is already quantized ({stored.get('quant_method')}, not bitsandbytes "
                                   "4-bit); fine-tune the original model", field="model")
        if request_config is not None:
            raise InvalidConfig("the base is already quantized and is loaded with its own config; leave "
                                "quantization_config out", field="quantization_config")
        return dict(stored), True
    used = dict(finetune_rules.normalize_base(request_config))
    used["bnb_4bit_compute_dtype"] = str(compute_dtype(used["bnb_4bit_compute_dtype"], device)).removeprefix("torch.")
    return used, False


def load_base(source_dir: Path, used: dict[str, Any], prequantized: bool, device: torch.device, *,
              allow_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = DTYPES[used.get("bnb_4bit_compute_dtype") or "float32"]
    kwargs: dict[str, Any] = {}
    if not prequantized:
        cfg = {k: v for k, v in used.items() if k != "quant_method"}
        kwargs["quantization_config"] = BitsAndBytesConfig(**cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source_dir), dtype=dtype, device_map={"": str(device)}, use_safetensors=True,
            trust_remote_code=allow_remote_code, **kwargs)
    except (ValueError, OSError, ImportError) as exc:
        raise UnsupportedModel(f"the base cannot be loaded in 4-bit: {exc}"[:1000], field="model") from None
    if device.type == "cpu":
        keep_one_cpu_layout(model)
    return model


def keep_one_cpu_layout(model: torch.nn.Module) -> int:
    """bitsandbytes' CPU inference path repacks a 4-bit weight in place the first time a layer runs without
    gradients (and asserts that its output size is a multiple of 32: stories260K's 172-wide MLP is not).
    Training alternates train and eval passes over the same weights, so the engine keeps the one layout the
    backward pass uses; returns the number of layers set so."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def add_adapters(model: torch.nn.Module, lora: dict[str, Any], *, gradient_checkpointing: bool) -> torch.nn.Module:
    """k-bit training preparation (frozen base, norms in float32, input grads for checkpointing), then
    LoRA adapters from the request's LoraConfig fields."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    fields = {k: v for k, v in lora.items() if v is not None}
    try:
        config = LoraConfig(**fields)
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules that match nothing in this model
        raise InvalidConfig(f"the adapter cannot be placed: {exc}"[:1000], field="lora.target_modules") from None


def make_optimizer(name: str, params: list[torch.nn.Parameter], *, lr: float, weight_decay: float,
                   device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """(the optimizer, its name as used): `auto` is paged_adamw_8bit on CUDA, adamw_torch on the CPU. A paged
    optimizer on the CPU is refused, never replaced."""
    if name == "auto":
        name = "paged_adamw_8bit" if device.type == "cuda" else "adamw_torch"
    if name in PAGED and device.type != "cuda":
        raise InvalidConfig(f"{name} pages optimizer state through CUDA unified memory; this worker runs on "
                            f"{device.type}: use adamw_torch", field="training.optim")
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), name
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), name
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay), name
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay), name
