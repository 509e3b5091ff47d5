"""Block discovery and Linear layers from config + tensor names."""

from __future__ import annotations

import pytest

from qaas.worker.engine.architecture import find_block_name, inspect_model
from qaas.worker.engine.checkpoint import CheckpointReader
from qaas.worker.engine.errors import UnsupportedModel


def test_stories_layout(stories_dir):
    layout = inspect_model(stories_dir, CheckpointReader(stories_dir))
    assert layout.block_name == "model.layers" and layout.num_blocks == 5
    assert layout.pre_tensors == ["model.embed_tokens.weight"]
    assert layout.post_tensors == ["model.norm.weight"]
    assert layout.tied_embeddings and layout.outside_linears == []
    assert "lm_head" in layout.default_skip_modules
    up = next(l for l in layout.blocks[0].linears if l.name.endswith("up_proj"))
    assert (up.in_features, up.out_features, up.transposed) == (64, 172, False)
    assert len(layout.blocks[0].linears) == 7
    units = list(layout.units())
    assert [u.kind for u in units] == ["pre"] + ["block"] * 5 + ["post"]
    covered = [n for u in units for n in u.tensor_names]
    assert sorted(covered) == sorted(CheckpointReader(stories_dir).names())


def test_gpt2_conv1d(tiny_gpt2_dir):
    layout = inspect_model(tiny_gpt2_dir, CheckpointReader(tiny_gpt2_dir))
    assert layout.block_name == "transformer.h" and layout.num_blocks == 2
    c_attn = next(l for l in layout.blocks[0].linears if l.name.endswith("c_attn"))
    assert c_attn.transposed and (c_attn.in_features, c_attn.out_features) == (64, 192) and c_attn.has_bias
    assert "transformer.wte.weight" in layout.pre_tensors and "transformer.ln_f.weight" in layout.post_tensors


def test_untied_head_is_outside_linear(tiny_llama_dir):
    layout = inspect_model(tiny_llama_dir, CheckpointReader(tiny_llama_dir))
    assert not layout.tied_embeddings
    assert [l.name for l in layout.outside_linears] == ["lm_head"]
    assert "lm_head.weight" in layout.post_tensors


def test_find_block_name():
    names = [f"model.decoder.layers.{i}.fc1.weight" for i in range(3)] + ["model.decoder.embed_tokens.weight"]
    assert find_block_name(names, 3) == "model.decoder.layers"
    with pytest.raises(UnsupportedModel) as exc:
        find_block_name(["foo.weight", "bar.weight"], 3)
    assert exc.value.field == "block_name_to_quantize"
    odd = [f"net.stack.{i}.w" for i in range(4)] + [f"net.other.{i}.w" for i in range(4)]
    with pytest.raises(UnsupportedModel, match="block_name_to_quantize"):
        find_block_name(odd, 4)
    assert find_block_name(odd, 4, "net.stack") == "net.stack"
    with pytest.raises(UnsupportedModel, match="names no repeated blocks"):
        find_block_name(odd, 4, "net.missing")


def test_requested_block_name_must_exist(stories_dir):
    with pytest.raises(UnsupportedModel) as exc:
        inspect_model(stories_dir, CheckpointReader(stories_dir), block_name_to_quantize="transformer.h")
    assert exc.value.field == "block_name_to_quantize"
