"""ShardedWriter writes full shards on a background thread: the files are the same as written in line, a
failed shard write (disk full) is raised by the next flush or by close, and a writer given up on leaves no
thread writing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qaas.worker.engine import checkpoint
from qaas.worker.engine.checkpoint import ShardedWriter
from qaas.worker.engine.errors import OutOfSpace


def _tensors(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64, 64, generator=g) for i in range(n)}  # 16 KiB each


def test_shards_written_in_the_background_hold_every_tensor(tmp_path):
    ts = _tensors()
    w = ShardedWriter(tmp_path, max_shard_size=40_000)  # two tensors per shard
    for k, v in ts.items():
        w.add(k, v)
    files = w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len([f for f in files if f.name.endswith(".safetensors")]) == 3
    got = {}
    for name in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / name))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_background_write_is_raised(tmp_path, monkeypatch):
    real = checkpoint.write_safetensors

    def full_disk(path, tensors, metadata):
        if path.name.startswith(".shard-00002"):
            raise OutOfSpace("no space left on device while writing a shard")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_safetensors", full_disk)
    w = ShardedWriter(tmp_path, max_shard_size=40_000)
    with pytest.raises(OutOfSpace):
        for k, v in _tensors().items():
            w.add(k, v)  # the third shard's flush waits for the second, whose write failed
        w.close()
    w.abandon()
    assert w._pool is None


def test_abandon_waits_for_the_shard_being_written(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_size=40_000)
    for k, v in _tensors(3).items():
        w.add(k, v)
    w.abandon()  # a failing job: nothing is left running
    assert w._pool is None and w._pending is None
