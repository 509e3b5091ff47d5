"""GPTQ checkpoint format (FORMATS.md §1): which layers it can hold, the tensors of one layer, the config,
and the reader that puts a saved checkpoint back into the original architecture.

Every format quirk lives here: v1 stores zero minus one (masked per field, so an asymmetric zero of 0 is
stored as 2^bits - 1 and a per-field `(stored + 1) & mask` recovers it), v2 stores the true zero, codes
are packed along the input dimension, zeros along the output dimension.

GPT-2's `Conv1D` (weight stored `[in, out]`) is written in Linear orientation, as AutoGPTQ and GPTQModel write
it: they replace a Conv1D by a QuantLinear with in_features = weight.shape[0], out_features = weight.shape[1]
and pack `W.t()`. So a Conv1D layer's qweight is `[in * bits / 32, out]`, scales `[G, out]`, g_idx `[in]`,
bias `[out]`, exactly like a Linear of the same in/out; the quantizer transposes the weight before GPTQ and a
reader that puts dequantized weights back into the original architecture transposes them for Conv1D
modules (decided by module type, never by shape: attn.c_proj is square).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from qaas.kernels import gptq as K

from ...checkpoint import CheckpointReader
from ...gptq_algorithm import GPTQResult

FORMATS = ("gptq", "gptq_v2")
#: The tensors of one quantized layer, by suffix of its module name.
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def stored_float(t: torch.Tensor) -> torch.Tensor:
    """A tensor the checkpoint keeps unquantized (embeddings, norms, skipped layers): float16, as GPTQ loaders
    expect; integer tensors unchanged."""
    return t.to(torch.float16) if t.is_floating_point() else t


def unsupported_reason(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why the v1/v2 layout cannot hold a layer of this shape, or None when it can.

    Codes are packed 32 at a time along `in` and zeros along `out` (3-bit needs whole runs of 32, and the
    loaders' kernels assume whole runs for every width), so both must be multiples of 32.
    """
    if in_features % 32:
        return f"in_features {in_features} is not a multiple of 32 (qweight packing)"
    if out_features % 32:
        return f"out_features {out_features} is not a multiple of 32 (qzeros packing)"
    return None


def pack_layer(res: GPTQResult, *, fmt: str = "gptq", bias: torch.Tensor | None = None,
               backend: str = "auto") -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer (suffixes qweight/qzeros/scales/g_idx[/bias])."""
    bits = res.bits
    mask = 2**bits - 1
    zeros = res.zeros.round().to(torch.int32)  # [G, out]
    stored = (zeros - 1) & mask if fmt == "gptq" else zeros
    out = {
        "qweight": K.pack_qweight(res.codes.t().contiguous(), bits, backend=backend),
        "qzeros": K.pack_qzeros(stored, bits, backend=backend),
        "scales": res.scales.to(torch.float16),
        "g_idx": res.g_idx.to(torch.int32),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def dequantize_layer(tensors: dict[str, torch.Tensor], bits: int, *, fmt: str = "gptq",
                     dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Weight `[out, in]` from one saved layer's tensors (keys without the module prefix)."""
    return K.dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits,
                        v1=(fmt == "gptq"), dtype=dtype, backend=backend)


def skip_regex(module_name: str) -> str:
    """GPTQModel / vLLM `dynamic` key that keeps one module in floating point."""
    return "-:" + re.escape(module_name) + "$"


def build_quantization_config(
    cfg: dict[str, Any],
    *,
    block_name: str,
    quantized_in_block: list[list[str]],
    skipped_modules: list[str],
    calibration: dict[str, Any] | None,
    quantizer_version: str,
) -> dict[str, Any]:
    """The dict written to quantize_config.json and config.json["quantization_config"].

    Loaders see which layers are quantized three ways: transformers/optimum through
    `modules_in_block_to_quantize` (block-relative names, applied to every block), GPTQModel and vLLM through
    `dynamic` ("-:<regex>" entries skip a module). `dataset` is not echoed (a list of strings would copy the
    calibration text into config.json, and a path is not a name GPTQConfig accepts); what was used is
    recorded under `meta.calibration`.
    """
    fmt = cfg.get("format", "gptq")
    out: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": cfg["bits"],
        "group_size": cfg["group_size"],
        "damp_percent": cfg["damp_percent"],
        "desc_act": cfg["desc_act"],
        "act_group_aware": cfg.get("act_group_aware", False),
        "sym": cfg["sym"],
        "true_sequential": cfg["true_sequential"],
        "static_groups": cfg.get("static_groups", False),
        "format": fmt,
        "checkpoint_format": fmt,
        "lm_head": False,
        "model_seqlen": cfg.get("model_seqlen"),
        "block_name_to_quantize": block_name,
        "modules_in_block_to_quantize": quantized_in_block,
        "module_name_preceding_first_block": cfg.get("module_name_preceding_first_block"),
        "batch_size": cfg.get("batch_size", 1),
        "cache_block_outputs": cfg.get("cache_block_outputs", True),
        "dataset": None,
        "meta": {"quantizer": [f"qaas:{quantizer_version}"], "calibration": calibration},
    }
    if skipped_modules:
        out["dynamic"] = {skip_regex(m): {} for m in skipped_modules}
    return out


@torch.no_grad()
def load_saved_weights(model: torch.nn.Module, out_dir: Path, *, bits: int, fmt: str) -> list[str]:
    """Copy every tensor of a saved GPTQ checkpoint into `model`, dequantizing quantized layers.

    Returns the names of the dequantized modules.
    """
    from transformers.pytorch_utils import Conv1D

    reader = CheckpointReader(out_dir)
    state = model.state_dict()
    modules = dict(model.named_modules())
    names = reader.names()
    qmods = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
    for m in qmods:
        w = dequantize_layer({s: reader.load(f"{m}.{s}") for s in LAYER_TENSORS}, bits, fmt=fmt)
        target = state[m + ".weight"]
        if isinstance(modules.get(m), Conv1D):  # GPT-2's Conv1D holds [in, out]; the checkpoint is Linear-oriented
            w = w.t()
        target.copy_(w.to(target.dtype))
    for n in names:
        if n.rpartition(".")[2] in LAYER_TENSORS:
            continue
        if n in state:
            state[n].copy_(reader.load(n).to(state[n].dtype))
    reader.close()
    return qmods
