"""Sharded writer, streaming reader, staged output, out-of-space handling."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qaas.worker.engine.checkpoint import CheckpointReader, ShardedWriter
from qaas.worker.engine.errors import InvalidConfig, OutOfSpace
from qaas.worker.engine.export import StagedOutput
from qaas.worker.engine.options import EngineOptions, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {f"model.layers.{i}.w": torch.randn(16, 16, generator=g) for i in range(6)}  # 1024 bytes each
    out["scalar"] = torch.tensor(0, dtype=torch.uint8)
    out["bf"] = torch.randn(7, generator=g).to(torch.bfloat16)
    out["view"] = torch.arange(100, dtype=torch.int32)[10:20]  # a view: must be written as its own bytes
    return out


def test_sharding_and_index(tmp_path):
    tensors = _tensors()
    w = ShardedWriter(tmp_path, max_shard_size=2500)
    peak = 0
    for k, v in tensors.items():
        w.add(k, v)
        peak = max(peak, w.buffered_bytes)
    files = w.close()
    assert peak <= 2500
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not list(tmp_path.glob(".shard-*"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert {f.name for f in files} == set(shards) | {"model.safetensors.index.json"}
    for s in shards:
        with safe_open(str(tmp_path / s), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    loaded = {}
    for s in shards:
        loaded.update(load_file(tmp_path / s))
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    # The reader streams the sharded checkpoint back.
    r = CheckpointReader(tmp_path)
    assert set(r.names()) == set(tensors)
    assert r.info("model.layers.3.w").shape == (16, 16) and r.info("bf").dtype == torch.bfloat16
    assert set(r.load_prefix("model.layers.1")) == {"model.layers.1.w"}
    assert r.total_bytes == index["metadata"]["total_size"]


def test_single_shard_named_model_safetensors(tmp_path):
    with ShardedWriter(tmp_path) as w:
        w.add_many(_tensors())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_oversized_tensor_gets_own_shard(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_size=100)
    w.add("a", torch.zeros(10))
    w.add("big", torch.zeros(1000))
    w.add("b", torch.zeros(10))
    w.close()
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(idx.values())) == 3


def test_duplicate_name(tmp_path):
    w = ShardedWriter(tmp_path)
    w.add("a", torch.zeros(1))
    with pytest.raises(ValueError):
        w.add("a", torch.zeros(1))


def test_enospc_becomes_out_of_space(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if "w" in mode and str(path).endswith(".tmp") else f

    monkeypatch.setattr(builtins, "open", fake_open)
    w = ShardedWriter(tmp_path, max_shard_size=100)
    with pytest.raises(OutOfSpace, match="no space left on device"):
        w.add("a", torch.zeros(100))
        w.add("b", torch.zeros(100))
        w.close()


def test_staged_output_commit_and_abort(tmp_path):
    final = tmp_path / "out"
    s = StagedOutput(final)
    (s.path / "config.json").write_text("{}")
    assert not final.exists()
    s.commit()
    assert (final / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(InvalidConfig, match="not empty"):
        StagedOutput(final)
    s2 = StagedOutput(tmp_path / "out2")
    (s2.path / "model.safetensors").write_bytes(b"x")
    s2.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(InvalidConfig):
        parse_size("lots")
    with pytest.raises(InvalidConfig):
        EngineOptions(max_shard_size="0MB")
    with pytest.raises(InvalidConfig) as exc:
        EngineOptions.from_dict({"nope": 1})
    assert exc.value.field == "nope"
