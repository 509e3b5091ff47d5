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


def test_copies_staged_through_a_small_ring_come_out_whole_and_in_order():
    """CopyDrain's ring holds less than the tensors put through it: `stage` waits for regions the drain has
    released, so every host copy is its tensor's bytes (no region reused while a copy still reads it)."""
    from qaas.worker.engine.host_copy import CopyDrain

    drain = CopyDrain(capacity=64 << 10)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g) for _ in range(200)]
    tensors.append(torch.arange(16, dtype=torch.int32).reshape(4, 4))
    assert all(drain.fits(t) for t in tensors) and sum(t.numel() * 4 for t in tensors) > 10 * (64 << 10)
    try:
        futures = [drain.submit(t) for t in tensors]
        for t, f in zip(tensors, futures):
            host = f.result(timeout=30)
            assert host.dtype == t.dtype and host.shape == t.shape and torch.equal(host, t)
    finally:
        drain.close()
    assert not drain.ring._live  # every region released
