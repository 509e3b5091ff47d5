"""A fine-tuning job's second output (`merge`): the adapter merged into its de-quantized base, re-quantized.

1. Every 4-bit weight of the trained model is dequantized by bitsandbytes itself (`dequantize_4bit` with the
   layer's own quant_state: the NF4/FP4 code times its block's absmax, a double-quantized absmax restored
   first), so the float base is exactly the one the adapter was trained on.
2. Each LoRA layer adds its delta `B @ A * scaling` in float32, with scaling `lora_alpha / r`, or
   `lora_alpha / sqrt(r)` with `use_rslora` (the layer's own r and alpha, after rank_pattern / alpha_pattern);
   a `fan_in_fan_out` layer's delta is transposed, an embedding's is `(B @ A)^T`. `modules_to_save` take
   their trained copies; a trained bias (`bias: all / lora_only`) is the trained one.
3. The merged model is written as a plain float checkpoint (config.json without quantization_config,
   safetensors in the source's stored dtype, float32 for a float32 source; the tokenizer files) into the
   attempt's work directory, and
4. quantized from there by the quantization pipeline (`pipeline.quantize`) with `merge.quantization_config`
   into `merged/` beside the adapter: the same code, checks, evaluation and file format as a quantization job.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import ShardedWriter
from ..errors import UnsupportedModel
from ..export import carry_over_files, write_json

#: The second output's folder inside the job's output.
MERGED_FOLDER = "merged"
#: Stored dtypes the merged checkpoint keeps; anything else is written in float32.
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dequantized_weight(param: torch.Tensor) -> torch.Tensor:
    """A layer's weight in float32: a bitsandbytes 4-bit weight dequantized by bitsandbytes (the layout its
    backward pass reads, which `model.keep_one_cpu_layout` keeps on the CPU), any other as it is."""
    if type(param).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, param.quant_state).float()
    if type(param).__name__ == "Int8Params":
        raise UnsupportedModel("merging into an 8-bit base is not offered; the base is 4-bit", field="merge")
    return param.detach().float()


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """LoRA's scale of B @ A: alpha / r, or rank-stabilized alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(layer: Any, adapter: str, use_rslora: bool) -> torch.Tensor:
    """The float32 delta one peft LoRA layer adds to its base weight (shape of that weight)."""
    if getattr(layer, "use_dora", {}).get(adapter):
        raise UnsupportedModel("merging a DoRA adapter is not offered", field="merge")
    r, alpha = layer.r[adapter], layer.lora_alpha[adapter]
    scale = lora_scaling(r, alpha, use_rslora)
    if adapter in getattr(layer, "lora_embedding_A", {}):
        a = layer.lora_embedding_A[adapter].detach().float()  # [r, num_embeddings]
        b = layer.lora_embedding_B[adapter].detach().float()  # [dim, r]
        return (b @ a).t() * scale
    a = layer.lora_A[adapter]
    b = layer.lora_B[adapter]
    if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
        raise UnsupportedModel(f"cannot merge a LoRA layer of kind {type(layer).__name__}", field="merge")
    if b.bias is not None:
        raise UnsupportedModel("merging a LoRA layer with its own bias (lora_bias) is not offered", field="merge")
    delta = b.weight.detach().float() @ a.weight.detach().float() * scale
    return delta.t() if getattr(layer, "fan_in_fan_out", False) else delta


def merged_tensors(model: torch.nn.Module, adapter: str, use_rslora: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) of the merged model's state, named as the base model's checkpoint, one layer
    at a time (only one dequantized weight exists at once): what `state_dict()` of the base would hold had
    the adapter been trained into it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    def walk(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[adapter] if adapter in module.modules_to_save else module.original_module
            yield from walk(trained, prefix)
            return
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = dequantized_weight(base.weight)
            if adapter in module.r:
                weight = weight + lora_delta(module, adapter, use_rslora)
            yield f"{prefix}weight", weight
            for name, p in base.named_parameters(recurse=False):
                if name != "weight":
                    yield f"{prefix}{name}", p.detach().float()
            return
        for name, p in module.named_parameters(recurse=False):
            yield f"{prefix}{name}", dequantized_weight(p) if name == "weight" else p.detach().float()
        for name, b in module.named_buffers(recurse=False):
            if b is not None and name not in module._non_persistent_buffers_set:
                yield f"{prefix}{name}", b.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    yield from walk(model, "")


@dataclass
class FloatCheckpoint:
    path: Path
    dtype: str
    tensors: int
    merged_layers: int
    untied: bool


def stored_dtype(config: dict[str, Any]) -> str:
    """The dtype the merged checkpoint is written in: the source's stored float dtype, else float32."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return name if name in FLOAT_DTYPES else "float32"


def write_float_checkpoint(peft_model: Any, source_dir: Path, out: Path, *, use_rslora: bool,
                           max_shard_size: int) -> FloatCheckpoint:
    """The merged model as a plain checkpoint in `out` (see the module docstring); returns what it wrote."""
    adapter = peft_model.active_adapter
    base = peft_model.get_base_model()
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    dtype_name = stored_dtype(config)
    dtype = FLOAT_DTYPES[dtype_name]
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name

    from peft.tuners.lora import LoraLayer

    merged_layers = sum(1 for m in base.modules() if isinstance(m, LoraLayer) and adapter in m.r)
    tied = bool(config.get("tie_word_embeddings", getattr(base.config, "tie_word_embeddings", False)))
    out_emb, in_emb = base.get_output_embeddings(), base.get_input_embeddings()
    names = {id(m): n for n, m in base.named_modules()}
    head = names.get(id(out_emb)) if out_emb is not None else None
    embed = names.get(id(in_emb)) if in_emb is not None else None
    if out.exists():
        shutil.rmtree(out)
    writer = ShardedWriter(out, max_shard_size=max_shard_size)
    written: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for name, tensor in merged_tensors(base, adapter, use_rslora):
            t = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if tied and head and embed and name in (f"{head}.weight", f"{embed}.weight"):
                written[name] = t  # one of a tied pair: written below, once or twice
                continue
            writer.add(name, t)
            count += 1
        untied = False
        if tied and written:
            pair = list(written.values())
            # a trained head or embedding (modules_to_save) no longer equals its twin: both are kept, untied
            untied = len(pair) == 2 and not torch.equal(pair[0], pair[1])
            for name, t in written.items():
                if untied or name == f"{embed}.weight" or len(written) == 1:
                    writer.add(name, t)
                    count += 1
            if untied:
                config["tie_word_embeddings"] = False
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    write_json(out / "config.json", config)
    carry_over_files(source_dir, out)
    return FloatCheckpoint(out, dtype_name, count, merged_layers, untied)
