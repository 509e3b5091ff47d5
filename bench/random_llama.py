"""Llama-shaped checkpoints with random fp16 weights, for the speed benchmarks: the real engine reads them from
disk like any source, with a real tokenizer, calibration text and evaluation text.

Shapes are Llama-3's (`SHAPES`; `tiny` is for CPU smoke tests). Only the blocks asked for are written: a
70B-shaped model of 3 blocks is 5 GB of blocks plus the embedding and head, not 140 GB. Each block is its
own shard in a store shared by every model of that shape (`<workdir>/<shape>-store/`), generated once from a
seed that depends on the block index, so a 4-block model is the first 4 blocks of the 32-block one: the
model directories hold config.json, the index, the tokenizer and symlinks to the store.

Tokenizer: a word-level vocabulary `t0 ... t{V-1}` over the whole vocabulary, so the calibration and
evaluation texts (random words, seeded) tokenize to uniformly random token ids, as random-id calibration did
before, through the engine's own text path.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    #: blocks of the real model (for extrapolating per-block figures)
    full_blocks: int
    head_dim: int = 128

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear layers of one block: name -> (out_features, in_features)."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "self_attn.q_proj": (self.heads * self.head_dim, h), "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, self.heads * self.head_dim),
            "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
        }

    def block_params(self) -> int:
        return sum(o * i for o, i in self.linears().values()) + 2 * self.hidden


SHAPES = {
    "8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, full_blocks=32),
    "70b": Shape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256, full_blocks=80),
    # CPU smoke tests: every dimension a multiple of the GPTQ group size (128)
    "tiny": Shape(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=1024, full_blocks=4, head_dim=32),
}


def hf_config(shape: Shape, blocks: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": blocks, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": shape.head_dim, "vocab_size": shape.vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float16", "dtype": "float16", "bos_token_id": 0,
        "eos_token_id": 1, "attention_bias": False, "mlp_bias": False,
    }


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _random(gen: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, device=gen.device, generator=gen) * std).half().cpu()


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)  # a killed run leaves no half-written shard that a later run would reuse


def _store_shard(store: Path, name: str, make) -> tuple[Path, bool]:
    path = store / name
    if path.exists():
        return path, False
    _save(path, make())
    return path, True


def _block_tensors(shape: Shape, index: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=_device()).manual_seed(1000 + index)
    p = f"model.layers.{index}."
    out = {p + name + ".weight": _random(gen, o, i) for name, (o, i) in shape.linears().items()}
    out[p + "input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.float16)
    out[p + "post_attention_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.float16)
    return out


def _write_tokenizer(store: Path, vocab: int) -> None:
    if (store / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(store / "tokenizer.json"))
    (store / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
        "bos_token": "t0", "eos_token": "t1", "unk_token": "t2"}))


def random_text(path: Path, vocab: int, words: int, seed: int) -> Path:
    """`words` random vocabulary words, seeded (written once)."""
    if not path.exists():
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (words,), generator=gen).tolist()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(" ".join(f"t{i}" for i in ids) + "\n")
        os.replace(tmp, path)
    return path


@dataclass
class RandomModel:
    path: Path
    shape_name: str
    shape: Shape
    blocks: int
    #: seconds spent writing shards that were not in the store yet, and how many bytes they hold
    write_s: float
    written_bytes: int

    def describe(self) -> dict:
        return {"shape": self.shape_name, **asdict(self.shape), "blocks": self.blocks, "write_s": round(self.write_s, 2),
                "written_bytes": self.written_bytes}


def random_model(workdir: Path, shape_name: str, blocks: int) -> RandomModel:
    """`<workdir>/<shape>-<blocks>b`: a model directory over the shape's shard store (missing shards written)."""
    shape = SHAPES[shape_name]
    store = workdir / f"{shape_name}-store"
    store.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = 0
    shards: dict[str, Path] = {}
    gen_pre = lambda: {"model.embed_tokens.weight": _random(  # noqa: E731
        torch.Generator(device=_device()).manual_seed(1), shape.vocab, shape.hidden)}
    gen_post = lambda: {"model.norm.weight": torch.ones(shape.hidden, dtype=torch.float16),  # noqa: E731
                        "lm_head.weight": _random(torch.Generator(device=_device()).manual_seed(2), shape.vocab,
                                                  shape.hidden)}
    specs = [("pre.safetensors", gen_pre), ("post.safetensors", gen_post)]
    specs += [(f"block-{i:03d}.safetensors", lambda i=i: _block_tensors(shape, i)) for i in range(blocks)]
    for name, make in specs:
        path, new = _store_shard(store, name, make)
        shards[name] = path
        if new:
            written += path.stat().st_size
    _write_tokenizer(store, shape.vocab)
    model = workdir / f"{shape_name}-{blocks}b"
    model.mkdir(exist_ok=True)
    from safetensors import safe_open

    weight_map = {}
    for name, path in shards.items():
        link = model / name
        if not link.is_symlink():
            link.symlink_to(path)
        with safe_open(str(path), framework="pt") as f:
            weight_map.update({k: name for k in f.keys()})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model / name).is_symlink():
            (model / name).symlink_to(store / name)
    (model / "config.json").write_text(json.dumps(hf_config(shape, blocks)))
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return RandomModel(model, shape_name, shape, blocks, time.perf_counter() - t0, written)
