"""The shape of a causal LM: its repeated decoder blocks, the Linear layers inside them, and what lies
before and after (embeddings, final norm, output head).

The module tree comes from transformers itself: the model class is instantiated on the `meta` device from
config.json (no memory, no weights), so "which modules are `nn.Linear`" and "what would transformers skip"
are answered exactly as `from_pretrained(..., quantization_config=...)` answers them. Tensor names come
from the checkpoint headers. Quantization methods walk `ModelLayout.units()` one unit (one block) at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointReader
from .errors import SourceRejected, UnsupportedModel

#: Block containers seen in transformers' causal LMs, in order of preference when several match.
KNOWN_BLOCK_NAMES = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "transformer.layers",
    "model.transformer.h",
    "transformer.encoder.layers",
    "language_model.model.layers",
)


@dataclass(frozen=True)
class LinearInfo:
    """One Linear layer (or GPT-2 `Conv1D`) as stored in the checkpoint."""

    #: Module name, e.g. "model.layers.0.mlp.up_proj"; its weight is `name + ".weight"`.
    name: str
    in_features: int
    out_features: int
    #: True for transformers' Conv1D (GPT-2 family): the stored weight is [in, out], not [out, in].
    #: Quantized formats store [out, in], so the weight is transposed before quantization.
    transposed: bool = False
    has_bias: bool = False

    @property
    def weight_name(self) -> str:
        return self.name + ".weight"

    @property
    def bias_name(self) -> str:
        return self.name + ".bias"


@dataclass
class BlockInfo:
    """One repeated decoder block."""

    index: int
    #: e.g. "model.layers.3"
    prefix: str
    #: All checkpoint tensors of the block.
    tensor_names: list[str]
    #: Its Linear layers, in module order.
    linears: list[LinearInfo]
    #: Bytes of its tensors in the source checkpoint.
    nbytes: int = 0


@dataclass
class Unit:
    """A group of tensors converted together: "pre" (before the blocks), one block, or "post"."""

    kind: str  # "pre" | "block" | "post"
    label: str
    tensor_names: list[str]
    linears: list[LinearInfo]
    block: BlockInfo | None = None


@dataclass
class ModelLayout:
    model_type: str
    architecture: str
    #: The block container, e.g. "model.layers" (GPTQ's `block_name_to_quantize`).
    block_name: str
    blocks: list[BlockInfo]
    #: Tensors outside the blocks, before them (embeddings) and after them (final norm, head).
    pre_tensors: list[str]
    post_tensors: list[str]
    #: Linear layers outside the blocks (e.g. an untied lm_head), which transformers would also convert.
    outside_linears: list[LinearInfo]
    #: The output head shares the input embedding (no separate lm_head tensor stored).
    tied_embeddings: bool
    #: What transformers skips when `llm_int8_skip_modules` is None (head, tied and last modules).
    default_skip_modules: list[str]
    #: The model class's `_keep_in_fp32_modules` (always kept in float by transformers).
    keep_in_fp32_modules: list[str]
    #: The transformers model instantiated on the meta device (module tree; no weights). Methods that run
    #: a block forward (GPTQ) take `meta_model.get_submodule(block.prefix)` and materialize it.
    meta_model: Any = field(repr=False, default=None)
    #: The transformers config object.
    hf_config: Any = field(repr=False, default=None)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def all_linears(self) -> list[LinearInfo]:
        out = [l for b in self.blocks for l in b.linears]
        return out + list(self.outside_linears)

    def units(self) -> Iterator[Unit]:
        """pre, block 0..N-1, post: the order in which methods stream the checkpoint."""
        outside = {l.weight_name: l for l in self.outside_linears}
        pre_l = [outside[n] for n in self.pre_tensors if n in outside]
        post_l = [outside[n] for n in self.post_tensors if n in outside]
        yield Unit("pre", "embeddings", list(self.pre_tensors), pre_l)
        for b in self.blocks:
            yield Unit("block", b.prefix, list(b.tensor_names), list(b.linears), b)
        yield Unit("post", "head", list(self.post_tensors), post_l)


def load_hf_config(source_dir: str | Path, *, allow_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source_dir), trust_remote_code=allow_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise SourceRejected(f"config.json cannot be read by transformers: {exc}", field="source") from None


def build_meta_model(hf_config: Any, *, allow_remote_code: bool = False) -> torch.nn.Module:
    """Instantiate the causal LM class on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=allow_remote_code)
    except ValueError as exc:
        raise UnsupportedModel(
            f"{type(hf_config).__name__} is not a causal language model transformers can build: {exc}"
        ) from None


def _num_layers(hf_config: Any) -> int | None:
    try:
        text = hf_config.get_text_config()
    except Exception:
        text = hf_config
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        v = getattr(text, attr, None)
        if isinstance(v, int):
            return v
    return None


def find_block_name(names: list[str], num_layers: int | None, requested: str | None = None) -> str:
    """Pick the repeated-block container from tensor names (`<container>.<i>.<...>`)."""
    counts: dict[str, set[int]] = {}
    for n in names:
        for m in re.finditer(r"\.(\d+)\.", n):
            counts.setdefault(n[: m.start()], set()).add(int(m.group(1)))
    if requested:
        requested = requested.rstrip(".")
        if requested not in counts:
            raise UnsupportedModel(
                f"block_name_to_quantize {requested!r} names no repeated blocks in this checkpoint"
                + (f" (found: {', '.join(sorted(counts)[:5])})" if counts else ""),
                field="block_name_to_quantize",
            )
        return requested

    def complete(k: str) -> bool:
        idx = counts[k]
        return idx == set(range(len(idx))) and (num_layers is None or len(idx) == num_layers)

    for k in KNOWN_BLOCK_NAMES:
        if k in counts and complete(k):
            return k
    candidates = [k for k in counts if complete(k) and len(counts[k]) > 1]
    if len(candidates) == 1:
        return candidates[0]
    raise UnsupportedModel(
        "cannot tell which modules are the repeated decoder blocks"
        + (f" (candidates: {', '.join(sorted(candidates))})" if candidates else "")
        + "; set block_name_to_quantize",
        field="block_name_to_quantize",
    )


def inspect_model(
    source_dir: str | Path,
    reader: CheckpointReader,
    *,
    block_name_to_quantize: str | None = None,
    allow_remote_code: bool = False,
    hf_config: Any = None,
) -> ModelLayout:
    """Describe the blocks and Linear layers of the checkpoint in `source_dir`."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    if hf_config is None:
        hf_config = load_hf_config(source_dir, allow_remote_code=allow_remote_code)
    meta = build_meta_model(hf_config, allow_remote_code=allow_remote_code)
    names = reader.names()
    block_name = find_block_name(names, _num_layers(hf_config), block_name_to_quantize)

    modules = dict(meta.named_modules())
    linears: dict[str, LinearInfo] = {}
    for mname, mod in modules.items():
        if type(mod) is torch.nn.Linear:
            linears[mname] = LinearInfo(mname, mod.in_features, mod.out_features, False, mod.bias is not None)
        elif isinstance(mod, Conv1D):
            in_f, out_f = mod.weight.shape
            linears[mname] = LinearInfo(mname, in_f, out_f, True, mod.bias is not None)
    # Only layers whose weight is actually stored with the expected shape (a tied head is not stored).
    stored: dict[str, LinearInfo] = {}
    for mname, li in linears.items():
        if li.weight_name in reader:
            shape = reader.info(li.weight_name).shape
            expect = (li.in_features, li.out_features) if li.transposed else (li.out_features, li.in_features)
            if tuple(shape) != expect:
                raise UnsupportedModel(f"{li.weight_name} has shape {tuple(shape)}, the model expects {expect}")
            stored[mname] = li
    if not any(k.startswith(block_name + ".") for k in stored):
        raise UnsupportedModel(
            f"no Linear layers found under {block_name!r} (checkpoint names do not match the "
            f"{type(meta).__name__} modules); set block_name_to_quantize",
            field="block_name_to_quantize",
        )

    block_re = re.compile(re.escape(block_name) + r"\.(\d+)\.")
    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for n in names:
        m = block_re.match(n)
        if m:
            by_block.setdefault(int(m.group(1)), []).append(n)
        else:
            outside.append(n)
    blocks = []
    for i in sorted(by_block):
        prefix = f"{block_name}.{i}"
        bl = [li for k, li in stored.items() if k.startswith(prefix + ".")]
        blocks.append(BlockInfo(i, prefix, by_block[i], bl, sum(reader.info(n).nbytes for n in by_block[i])))

    # Before/after the blocks follows the module order of the model (embeddings first).
    order = {n: i for i, (n, _) in enumerate(meta.named_parameters(remove_duplicate=False))}
    order.update({n: i for i, (n, _) in enumerate(meta.named_buffers(), start=len(order)) if n not in order})
    first_block = min((order[n] for b in blocks for n in b.tensor_names if n in order), default=0)
    pre = [n for n in outside if order.get(n, 1 << 30) < first_block]
    post = [n for n in outside if n not in set(pre)]
    outside_l = [li for k, li in stored.items() if not k.startswith(block_name + ".")]

    tied = bool(getattr(meta, "all_tied_weights_keys", None)) and not any(
        k in reader for k in getattr(meta, "all_tied_weights_keys", {})
    )
    keep32 = sorted(getattr(meta, "_keep_in_fp32_modules", None) or [])
    return ModelLayout(
        model_type=getattr(hf_config, "model_type", "") or "",
        architecture=type(meta).__name__,
        block_name=block_name,
        blocks=blocks,
        pre_tensors=pre,
        post_tensors=post,
        outside_linears=outside_l,
        tied_embeddings=tied,
        default_skip_modules=sorted(get_keys_to_not_convert(meta)),
        keep_in_fp32_modules=keep32,
        meta_model=meta,
        hf_config=hf_config,
    )
