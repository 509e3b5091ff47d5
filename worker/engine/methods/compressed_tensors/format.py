"""The compressed-tensors checkpoint layout (what `ModelCompressor.compress_model` + `save_pretrained` write):
one weight to its tensors and back, the GPTQ result in the same layout, and the run-time activation
quantization the serving engines apply (for evaluating without compressed-tensors installed).

Per quantized Linear `<m>`, by format:
  * float-quantized (FP8*): `<m>.weight` float8_e4m3fn `[out, in]`, `<m>.weight_scale` in the model's dtype:
    `[1]` (tensor), `[out, 1]` (channel), `[ceil(out/128), ceil(in/128)]` (block); static FP8 adds
    `<m>.input_scale` `[1]`;
  * int-quantized (W8A8): `<m>.weight` int8 `[out, in]`, `<m>.weight_scale` `[out, 1]`;
  * pack-quantized (W4A16/W8A16): `<m>.weight_packed` int32 `[out, ceil(in * bits / 32)]` (code + 2^(bits-1),
    element i of a row at bit (i * bits) of the row's bit stream, little-endian words), `<m>.weight_scale`
    `[out, in / group_size]`, `<m>.weight_shape` int64 `[2]`.
Symmetric schemes store no zero point. Scales and codes follow compressed-tensors' arithmetic in the weight's
dtype (`qaas.kernels.fp8` for e4m3; `int_codes` here), so round-to-nearest output is byte for byte what
llm-compressor writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qaas.kernels.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8, tile_scales

from ...checkpoint import CheckpointReader
from .schemes import Scheme

#: suffixes of a quantized layer's tensors (besides a bias, which stays as it is)
LAYER_SUFFIXES = ("weight", "weight_scale", "weight_packed", "weight_shape", "input_scale", "weight_zero_point")


def fp8_tile(scheme: Scheme, shape: tuple[int, int]) -> tuple[int, int] | None:
    """The tile sharing one scale: None (the whole tensor), one row, or the block."""
    if scheme.strategy == "tensor":
        return None
    if scheme.strategy == "channel":
        return (1, shape[1])
    return scheme.block


def stored_scale_shape(scheme: Scheme, scale: torch.Tensor) -> torch.Tensor:
    """The scale as compressed-tensors stores it: `[1]` for a per-tensor scale, else 2-D."""
    return scale.reshape(1) if scheme.strategy == "tensor" else scale


def int_scales(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """compressed-tensors' symmetric int scale per row (group_size None) or per group of columns, in w's dtype:
    max(|min(w, 0)|, |max(w, 0)|) / ((2^bits - 1) / 2) (so absmax / 127.5 for int8, / 7.5 for int4), zero
    scales replaced by the dtype's eps."""
    R, C = w.shape
    gs = C if group_size is None else group_size
    absmax = w.abs().reshape(R, C // gs, gs).amax(dim=2)
    half_range = torch.tensor(float(2**bits - 1), dtype=w.dtype, device=w.device) / 2
    s = absmax / half_range
    return torch.where(s == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device), s)


def int_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """round(clamp(w / scale + 0, -2^(bits-1), 2^(bits-1) - 1)) as int8, the quotient in w's dtype."""
    R, C = w.shape
    ng = scale.shape[1]
    s = scale.to(w.dtype).repeat_interleave(C // ng, dim=1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.round(torch.clamp(w / s + 0.0, lo, hi)).to(torch.int8)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32` along rows for 4 and 8 bits: `[out, ceil(in * bits / 32)]`."""
    per = 32 // bits
    R, C = codes.shape
    words = -(-C // per)
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    u = torch.nn.functional.pad(u, (0, words * per - C)).view(R, words, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    packed = (u << shifts).sum(dim=2)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def int_layer_tensors(scheme: Scheme, codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of an int layer (suffix -> tensor) from its int8 codes `[out, in]` and scales."""
    if scheme.format == "int-quantized":
        return {"weight": codes, "weight_scale": scale}
    return {"weight_packed": pack_int32(codes, scheme.bits), "weight_scale": scale,
            "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}


def quantize_weight(w: torch.Tensor, scheme: Scheme, *, backend: str = "auto"
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Round-to-nearest: the stored tensors of one weight `[out, in]` (suffix -> tensor) and the dequantized
    weight (in w's dtype) that a loader reconstructs."""
    if scheme.weight_type == "float":
        tile = fp8_tile(scheme, tuple(w.shape))
        scale = tile_scales(w, tile)
        q = quantize_fp8(w, scale, tile, backend=backend)
        return ({"weight": q, "weight_scale": stored_scale_shape(scheme, scale)},
                dequantize_fp8(q, scale, tile, w.dtype, backend=backend))
    scale = int_scales(w, scheme.bits, scheme.group_size)
    codes = int_codes(w, scale, scheme.bits)
    return int_layer_tensors(scheme, codes, scale), dequantize_int(codes, scale)


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """code (as the scale's dtype) * scale, per row or group (compressed-tensors' `dequantize`)."""
    ng = scale.shape[1]
    s = scale.repeat_interleave(codes.shape[1] // ng, dim=1)
    return codes.to(scale.dtype) * s


def dequantize_layer(tensors: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """The weight `[out, in]` (in the scale's dtype) of one saved layer (keys: suffixes)."""
    scale = tensors["weight_scale"]
    if scheme.weight_type == "float":
        q = tensors["weight"]
        s2 = scale.reshape(1, 1) if scheme.strategy == "tensor" else scale
        return dequantize_fp8(q, s2, fp8_tile(scheme, tuple(q.shape)), scale.dtype)
    if scheme.format == "int-quantized":
        return dequantize_int(tensors["weight"], scale)
    rows, cols = (int(v) for v in tensors["weight_shape"].tolist())
    return dequantize_int(unpack_int32(tensors["weight_packed"], scheme.bits, cols), scale)


def saved_layers(reader: CheckpointReader) -> list[str]:
    """Module names of the quantized layers of a saved checkpoint."""
    names = set(reader.names())
    return sorted({n[: -len(".weight_scale")] for n in names if n.endswith(".weight_scale")})


@torch.no_grad()
def load_saved_weights(model: torch.nn.Module, out_dir: Path, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Put every tensor of a saved checkpoint into `model` (float architecture), dequantizing quantized layers.

    Returns {module name: input_scale} of static FP8 layers (for `attach_activation_quantization`)."""
    reader = CheckpointReader(out_dir)
    state = model.state_dict()
    qmods = saved_layers(reader)
    input_scales: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for m in qmods:
        tensors = {s: reader.load(f"{m}.{s}") for s in LAYER_SUFFIXES if f"{m}.{s}" in reader}
        w = dequantize_layer(tensors, scheme)
        target = state[m + ".weight"]
        target.copy_(w.to(target.dtype))
        if "input_scale" in tensors:
            input_scales[m] = tensors["input_scale"]
        done.update(f"{m}.{s}" for s in tensors)
    for n in reader.names():
        if n not in done and n in state:
            state[n].copy_(reader.load(n).to(state[n].dtype))
    reader.close()
    return input_scales


# -- activations, as the serving engines quantize them --------------------------------------------------


def fake_quantize_input(x: torch.Tensor, scheme: Scheme, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x quantized and dequantized as compressed-tensors' forward does for the scheme's input activations
    (dynamic per token / per 128-group, or the static per-tensor `input_scale`); x unchanged for A16."""
    if scheme.inputs is None:
        return x
    typ, strategy, dynamic, group = scheme.inputs
    qmax = FP8_MAX if typ == "float" else 127.5
    shape = x.shape
    if strategy == "group":
        x = x.unflatten(-1, (shape[-1] // group, group))
    if not dynamic:
        s = input_scale.to(x.dtype)
    elif strategy == "tensor":
        s = x.abs().amax() / torch.tensor(qmax, dtype=x.dtype, device=x.device)
    else:
        s = x.abs().amax(dim=-1, keepdim=True) / torch.tensor(qmax, dtype=x.dtype, device=x.device)
    if dynamic:
        s = torch.where(s == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype, device=x.device), s)
    y = x / s + 0.0
    if typ == "float":
        q = torch.clamp(y, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        q = torch.round(torch.clamp(y, -128, 127))
    out = q * s
    return out.reshape(shape)


def attach_activation_quantization(model: torch.nn.Module, modules: list[str], scheme: Scheme,
                                   input_scales: dict[str, torch.Tensor]) -> None:
    """Forward pre-hooks that quantize each listed Linear's input as the serving engine does."""
    if scheme.inputs is None:
        return
    for name in modules:
        mod = model.get_submodule(name)
        scale = input_scales.get(name)

        def hook(m, args, scale=scale):
            return (fake_quantize_input(args[0], scheme, None if scale is None else scale.to(args[0].device)),
                    *args[1:])

        mod.register_forward_pre_hook(hook)
