"""The bitsandbytes checkpoint layout (FORMATS.md §2-§4): one weight to the tensors `save_pretrained` writes for
a Linear4bit / Linear8bitLt, back again, and the config.json entry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qaas.kernels.bnb4 import QuantState4bit, dequantize_4bit, quantize_4bit
from qaas.kernels.int8 import dequantize_int8_rowwise, quantize_int8_rowwise

from ...architecture import ModelLayout
from ...checkpoint import CheckpointReader
from ...evaluate import relative_error

BLOCKSIZE = 64  # bitsandbytes' Params4bit default (CUDA and CPU)


def bnb_config_dict(fields: dict[str, Any]) -> dict[str, Any]:
    """`BitsAndBytesConfig(**fields).to_dict()` as it lands in config.json (JSON types only), for the
    normalized config `fields`."""
    from transformers import BitsAndBytesConfig

    kwargs = {k: v for k, v in fields.items() if k != "quant_method"}
    return json.loads(json.dumps(BitsAndBytesConfig(**kwargs).to_dict()))


def quantize_weight(weight_name: str, w: torch.Tensor, fields: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
    """The tensors one Linear weight `[out, in]` becomes (keys are full checkpoint names), and the relative
    error of the quantized weight."""
    if fields["load_in_4bit"]:
        packed, state = quantize_4bit(w, blocksize=BLOCKSIZE, quant_type=fields["bnb_4bit_quant_type"],
                                      compress_statistics=fields["bnb_4bit_use_double_quant"])
        return ({weight_name: packed, **state.as_state_dict(prefix=weight_name)},
                relative_error(w, dequantize_4bit(packed, state)))
    # Int8Params quantizes a float16 copy of the weight; so do we, for the same bytes.
    q, scb = quantize_int8_rowwise(w.to(torch.float16))
    module = weight_name.removesuffix(".weight")
    tensors = {weight_name: q, module + ".SCB": scb, module + ".weight_format": torch.tensor(0, dtype=torch.uint8)}
    return tensors, relative_error(w, dequantize_int8_rowwise(q, scb, torch.float32))


def read_weight(reader: CheckpointReader, module: str) -> torch.Tensor:
    """The dequantized weight `[out, in]` of one converted module of a saved checkpoint."""
    wname = module + ".weight"
    if module + ".SCB" in reader:
        return dequantize_int8_rowwise(reader.load(wname), reader.load(module + ".SCB"), torch.float32)
    blob_key = next(k for k in reader.names_with_prefix(wname + ".quant_state") if "bitsandbytes__" in k)
    meta = json.loads(bytes(reader.load(blob_key).tolist()).decode())
    nested = meta.get("nested_offset") is not None
    state = QuantState4bit(
        absmax=reader.load(wname + ".absmax"),
        code=reader.load(wname + ".quant_map"),
        blocksize=meta["blocksize"],
        quant_type=meta["quant_type"],
        dtype=getattr(torch, meta["dtype"]),
        shape=tuple(meta["shape"]),
        offset=meta.get("nested_offset"),
        nested_absmax=reader.load(wname + ".nested_absmax") if nested else None,
        nested_code=reader.load(wname + ".nested_quant_map") if nested else None,
        nested_blocksize=meta.get("nested_blocksize", 256),
    )
    return dequantize_4bit(reader.load(wname), state)


def dequantizing_replacer(out_dir: Path, modules: list[str], layout: ModelLayout) -> Callable[[torch.nn.Module], None]:
    """A function that puts the dequantized weights stored in `out_dir` into a float model."""
    transposed = {l.name for l in layout.all_linears() if l.transposed}

    def replace(model: torch.nn.Module) -> None:
        reader = CheckpointReader(out_dir)
        for name in modules:
            module = model.get_submodule(name)
            w = read_weight(reader, name)
            if name in transposed:
                w = w.t()
            module.weight.data = w.to(module.weight.dtype).contiguous()
        reader.close()

    return replace
