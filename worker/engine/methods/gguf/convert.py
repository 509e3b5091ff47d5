"""A Hugging Face Llama- or Qwen-family checkpoint as GGUF: what each tensor becomes and the metadata llama.cpp
reads.

Nothing here holds the model: `plan_tensors` works from the checkpoint's index (names, shapes), and
`source_values` turns one tensor, loaded on its own, into the values every output file starts from. The
layout is the one llama.cpp's graph for the architecture (`GRAPHS`: LLAMA, QWEN2, QWEN3) expects, as the
`gguf` package's tensor-name map spells it:
  * names mapped with `gguf.get_tensor_name_map(graph, n_blocks)` (Qwen's q/k/v biases and Qwen3's
    q_norm / k_norm included);
  * for the LLAMA graph only, q_proj / k_proj rows (and biases) permuted from Hugging Face's rotate-half RoPE
    layout back to the interleaved one llama.cpp applies there (per head, the two halves of each head's rows
    interleaved); the Qwen graphs apply rotate-half RoPE (NEOX) themselves and take the rows as they are;
  * 1-D tensors and norms stay F32 in every file; the other weights are written in the conversion's float
    type (F16 by default) and every quant type starts from those rounded values, as llama-quantize does from
    an F16 file;
  * Llama 3's RoPE frequency scaling is the extra `rope_freqs` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qaas.quantization_rules.gguf import ARCHITECTURES

from ...errors import InvalidConfig

#: Hugging Face tensors llama.cpp has no use for.
IGNORED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
ROPE_FREQS = "rope_freqs.weight"


@dataclass(frozen=True)
class Graph:
    """The llama.cpp graph a Hugging Face architecture converts to, and what that graph's conversion does."""

    arch: gguf.MODEL_ARCH
    #: q/k rows from rotate-half back to interleaved pairs (the LLAMA graph's RoPE).
    permute_qk: bool
    #: `<arch>.vocab_size` and `<arch>.rope.dimension_count`, which the converter writes for the Llama family.
    llama_hparams: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


_LLAMA = Graph(gguf.MODEL_ARCH.LLAMA, permute_qk=True, llama_hparams=True)
#: Every architecture the submission rules accept (`ARCHITECTURES`), by its config.json name.
GRAPHS: dict[str, Graph] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": Graph(gguf.MODEL_ARCH.QWEN2, permute_qk=False, llama_hparams=False),
    "Qwen3ForCausalLM": Graph(gguf.MODEL_ARCH.QWEN3, permute_qk=False, llama_hparams=False),
}
assert set(GRAPHS) == set(ARCHITECTURES), "the rules and the converter must name the same architectures"


def graph(config: dict[str, Any]) -> Graph:
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in GRAPHS:
        raise InvalidConfig(f"GGUF conversion supports {', '.join(GRAPHS)}; this model is "
                            f"{arch or 'of no declared architecture'}", field="model")
    return GRAPHS[arch]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its GGUF name, the Hugging Face tensor it comes from (None: computed), numpy shape."""

    name: str
    hf_name: str | None
    shape: tuple[int, ...]
    #: True for the tensors kept F32 in every file (1-D tensors, norms).
    keep_f32: bool

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the older top-level `rope_theta` / `rope_scaling`."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1's per-frequency RoPE scaling (rope_type "llama3"), which llama.cpp reads as `rope_freqs`."""
    rope = rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    dim = head_dim(config)
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:  # 0-d float32 tensors: the arithmetic is float32, as llama.cpp's converter computes it
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return np.asarray(out, dtype=np.float32)


def plan_tensors(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
    """Every GGUF tensor in file order (the extra RoPE tensor, then the checkpoint's tensors by name, the order
    of a safetensors file), from the checkpoint's names and shapes."""
    n_blocks = config["num_hidden_layers"]
    g = graph(config)
    names = gguf.get_tensor_name_map(g.arch, n_blocks)
    planned: list[PlannedTensor] = []
    factors = llama3_rope_factors(config)
    if factors is not None:
        planned.append(PlannedTensor(ROPE_FREQS, None, tuple(factors.shape), True))
    for hf_name in sorted(shapes):
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InvalidConfig(f"GGUF: the checkpoint tensor {hf_name!r} has no place in llama.cpp's "
                                f"{g.name} graph", field="model")
        shape = tuple(shapes[hf_name])
        planned.append(PlannedTensor(name, hf_name, shape, len(shape) <= 1 or name.endswith("_norm.weight")))
    return planned


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # rows of each head: [first half | second half] (rotate-half) -> interleaved pairs (llama.cpp's RoPE)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_values(t: PlannedTensor, hf_tensor: torch.Tensor | None, config: dict[str, Any]) -> torch.Tensor:
    """The float32 values of one tensor in llama.cpp's layout (before rounding to the file's float type)."""
    if t.hf_name is None:
        factors = llama3_rope_factors(config)
        assert factors is not None
        return torch.from_numpy(factors)
    w = hf_tensor.to(torch.float32)
    if graph(config).permute_qk:
        if t.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _permute(w, config["num_attention_heads"])
        elif t.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _permute(w, config.get("num_key_value_heads") or config["num_attention_heads"])
    return w.contiguous()


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], file_type: int) -> None:
    """The architecture's hyper-parameters (`llama.*`, `qwen2.*`, ...) and the file type, in the order
    llama.cpp's converter writes them."""
    writer.add_block_count(config["num_hidden_layers"])
    n_ctx = config.get("max_position_embeddings")
    if n_ctx is not None:
        writer.add_context_length(n_ctx)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        writer.add_head_count_kv(config["num_key_value_heads"])
    rope = rope_parameters(config)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default", "llama3"):
        raise InvalidConfig(f"GGUF: RoPE scaling {rope_type!r} is not converted (default, linear, yarn, llama3 are)",
                            field="model")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(file_type)
    if graph(config).llama_hparams:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim(config))


def add_model_metadata(writer: gguf.GGUFWriter, source_dir: Path, model_name: str | None,
                       total_params: int) -> None:
    """`general.*`: the model's name, size label and what its model card says (gguf.Metadata's reading)."""
    meta = gguf.Metadata.load(None, source_dir, model_name, total_params)
    if meta.name is None:
        meta.name = source_dir.name
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
