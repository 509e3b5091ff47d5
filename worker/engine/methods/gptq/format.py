"""GPTQ checkpoint format (FORMATS.md §1): which layers it can hold, the tensors of one layer, the config,
and the reader that puts a saved checkpoint back into the original architecture.

Every format quirk lives here: v1 stores zero minus one, v2 the true zero; codes are packed along the input
dimension, zeros along the output dimension, each to `ceil(n * bits / 32)` words (a width that is not a
multiple of the packing ends in zero padding, as GPTQModel allocates it). Which format is written is decided
by `qaas.quantization_rules.gptq.written_format` (asymmetric: always v2, since GPTQModel converts v1 with a
word-wide carry and refuses asymmetric v1 from other quantizers); which shapes are written by
`unsupported_reason` here and the engine table (`qaas.quantization_rules.engines`).

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

from ...checkpoint import load_packed_checkpoint
from ...gptq_algorithm import GPTQResult

FORMATS = ("gptq", "gptq_v2")
#: The tensors of one quantized layer, by suffix of its module name.
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def stored_float(t: torch.Tensor) -> torch.Tensor:
    """A tensor the checkpoint keeps unquantized (embeddings, norms, skipped layers): float16, as GPTQ loaders
    expect; integer tensors unchanged."""
    return t.to(torch.float16) if t.is_floating_point() else t


def packed_rows(n: int, bits: int) -> int:
    """Words that hold `n` codes packed along one dimension: `ceil(n * bits / 32)`, as GPTQModel sizes its
    buffers (`math.ceil(in_features * bits / 32)` qweight rows, `math.ceil(out_features * bits / 32)` qzeros
    columns). A width that is not a multiple of the packing (stories260K's 172 at 4 bits: 22 words, 176
    codes) ends in zero padding that readers cut off at `in_features` / `out_features`."""
    return -(-n * bits // 32)


def unsupported_reason(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why a layer of this shape stays in float16 (no consumer could read it quantized), or None.

    2/4/8-bit fields never straddle a word, so any width is written padded (`packed_rows`), exactly the
    tensors GPTQModel allocates and unpacks. 3-bit packs 32 codes into 3 words and GPTQModel's unpacker
    (`PackableQuantLinear.dequantize_weight`) reshapes qweight by whole runs of 3 words and qzeros exactly to
    `[G, out]`, so a padded 3-bit layer does not load: both widths must be multiples of 32. A partial last
    group (`in % group_size`) is refused by every kernel but GPTQModel's pure-torch one (vLLM sizes scales
    `in // group_size`, GPTQModel's fused/AVX-512 CPU kernels and Marlin assert whole groups), so such a layer
    stays in float16 too (`qaas.quantization_rules.engines` has the sources).
    """
    if bits == 3:
        if in_features % 32:
            return f"in_features {in_features} is not a multiple of 32 (3-bit packing runs of 32)"
        if out_features % 32:
            return f"out_features {out_features} is not a multiple of 32 (3-bit qzeros packing runs of 32)"
    if group_size != -1 and in_features % group_size:
        return (f"in_features {in_features} is not a multiple of group_size {group_size} (a partial last group "
                "does not load in vLLM or GPTQModel's CPU kernels)")
    return None


def _pack_padded(values: torch.Tensor, bits: int, backend: str) -> torch.Tensor:
    """`[K, N]` codes packed along dim 0 into `[packed_rows(K), N]` words, K padded with zero codes."""
    n = values.shape[0]
    pad = -n % 32
    if pad:
        values = torch.cat([values, values.new_zeros((pad, values.shape[1]))])
    return K.pack_rows(values.contiguous(), bits, backend=backend)[: packed_rows(n, bits)]


def pack_layer(res: GPTQResult, *, fmt: str = "gptq", bias: torch.Tensor | None = None,
               backend: str = "auto") -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer (suffixes qweight/qzeros/scales/g_idx[/bias]).

    v1 stores `zero - 1`; it is written only for symmetric configs (`written_format`), whose zero
    2^(bits-1) never makes that negative, so the per-field value is exactly what GPTQModel's word-wide
    `+ 0x11111111` conversion turns back into the zero. Asymmetric outputs are v2 (the true zero).
    """
    bits = res.bits
    mask = 2**bits - 1
    zeros = res.zeros.round().to(torch.int32)  # [G, out]
    stored = (zeros - 1) & mask if fmt == "gptq" else zeros
    out = {
        "qweight": _pack_padded(res.codes.t(), bits, backend),
        "qzeros": _pack_padded(stored.t(), bits, backend).t().contiguous(),
        "scales": res.scales.to(torch.float16),
        "g_idx": res.g_idx.to(torch.int32),
    }
    if bias is not None:
        out["bias"] = bias.detach().to(torch.float16)
    return out


def _unpadded(words: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Packed rows for `n` codes grown back to whole runs of 32 (zero words), as the kernels unpack."""
    full = -(-n // 32) * bits
    if words.shape[0] < full:
        words = torch.cat([words, words.new_zeros((full - words.shape[0], words.shape[1]))])
    return words


def dequantize_layer(tensors: dict[str, torch.Tensor], bits: int, *, fmt: str = "gptq",
                     dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """Weight `[out, in]` from one saved layer's tensors (keys without the module prefix); in = len(g_idx),
    out = scales' columns (padded widths are cut off)."""
    g_idx, scales = tensors["g_idx"], tensors["scales"]
    n_in, n_out = g_idx.numel(), scales.shape[1]
    qweight = _unpadded(tensors["qweight"], n_in, bits)
    qzeros = _unpadded(tensors["qzeros"].t(), n_out, bits).t().contiguous()
    pad_in, pad_out = qweight.shape[0] * 32 // bits - n_in, qzeros.shape[1] * 32 // bits - n_out
    if pad_in:
        g_idx = torch.cat([g_idx, g_idx.new_zeros(pad_in)])
    if pad_out:
        scales = torch.cat([scales, scales.new_zeros((scales.shape[0], pad_out))], dim=1)
        qweight = torch.cat([qweight, qweight.new_zeros((qweight.shape[0], pad_out))], dim=1)
    w = K.dequantize(qweight, qzeros, scales, g_idx, bits, v1=(fmt == "gptq"), dtype=dtype, backend=backend)
    return w[:n_out, :n_in]


def skip_regex(module_name: str) -> str:
    """GPTQModel / vLLM `dynamic` key that keeps one module in floating point."""
    return "-:" + re.escape(module_name) + "$"


def build_quantization_config(
    cfg: dict[str, Any],
    *,
    fmt: str,
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
    recorded under `meta.calibration`. `fmt` is the format written (`written_format`), which both
    `format` and `checkpoint_format` carry (transformers' GPTQConfig reads either).
    """
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

    modules = dict(model.named_modules())

    def weight(module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        w = dequantize_layer(tensors, bits, fmt=fmt)
        # GPT-2's Conv1D holds [in, out]; the checkpoint is Linear-oriented
        return w.t() if isinstance(modules.get(module), Conv1D) else w

    return load_packed_checkpoint(model, out_dir, LAYER_TENSORS, weight)
