"""Streaming access to checkpoints: read one tensor or one decoder block at a time, write shards as tensors
are produced.

`CheckpointReader` lists names, shapes and dtypes from the safetensors headers without loading anything and
loads tensors on demand (memory-mapped through `safe_open`). `ShardedWriter` buffers at most one shard,
writes it as soon as the next tensor would overflow `max_shard_size`, and names the files only at the end,
when the number of shards is known. Both are shared by every quantization method.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OutOfSpace, SourceRejected
from .host_copy import CopyDrain, begin_to_host, copies_done
from .options import DEFAULT_MAX_SHARD_SIZE
from .source import read_safetensors_header

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the checkpoint describes it, before loading."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    nbytes: int


class CheckpointReader:
    """Read-only view of a (possibly sharded) safetensors checkpoint directory.

    Nothing is loaded at construction; `load`, `load_many` and `load_prefix` return CPU tensors that own
    their memory, so the caller decides how long they live. With `allow_pickle`, a directory that holds
    only `pytorch_model*.bin` files is read with `torch.load(weights_only=True, mmap=True)` instead.
    """

    def __init__(self, directory: str | os.PathLike, *, allow_pickle: bool = False) -> None:
        self.directory = Path(directory)
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[str, Any] = {}
        self._pickle: dict[str, dict[str, torch.Tensor]] | None = None
        files = self._weight_files()
        if files:
            for fname in files:
                header = read_safetensors_header(self.directory / fname)
                for name, entry in header.items():
                    dtype = SAFETENSORS_TO_TORCH.get(entry["dtype"])
                    if dtype is None:
                        raise SourceRejected(f"{fname}: tensor {name!r} has unsupported dtype {entry['dtype']}")
                    b, e = entry["data_offsets"]
                    self._infos[name] = TensorInfo(name, tuple(entry["shape"]), dtype, fname, e - b)
        elif allow_pickle:
            self._load_pickle_index()
        else:
            raise SourceRejected(f"no safetensors weights in {self.directory}")

    # -- listing -------------------------------------------------------------------------------------
    def _weight_files(self) -> list[str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted(set(weight_map.values()))
        if (self.directory / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        return sorted(p.name for p in self.directory.glob("*.safetensors"))

    def _load_pickle_index(self) -> None:
        files = sorted(p for p in self.directory.glob("*.bin")) + sorted(self.directory.glob("*.pt"))
        if not files:
            raise SourceRejected(f"no weights in {self.directory}")
        self._pickle = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # weights_only refuses anything but tensors
                raise SourceRejected(f"{f.name}: cannot load safely as weights ({type(exc).__name__})") from None
            if not isinstance(sd, dict):
                raise SourceRejected(f"{f.name}: not a state dict")
            self._pickle[f.name] = sd
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    self._infos[name] = TensorInfo(name, tuple(t.shape), t.dtype, f.name, t.numel() * t.element_size())

    @property
    def files(self) -> list[str]:
        """Weight files of the checkpoint (relative names)."""
        return sorted({i.file for i in self._infos.values()})

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    @property
    def total_bytes(self) -> int:
        """Sum of tensor sizes (what an index's metadata.total_size holds)."""
        return sum(i.nbytes for i in self._infos.values())

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Names under a module prefix: `"model.layers.1"` matches `model.layers.1.*`, not `model.layers.10.*`."""
        p = prefix.rstrip(".") + "."
        return [n for n in self._infos if n.startswith(p)]

    # -- loading -------------------------------------------------------------------------------------
    def load(self, name: str) -> torch.Tensor:
        """Load one tensor onto the CPU."""
        info = self._infos[name]
        if self._pickle is not None:
            return self._pickle[info.file][name].clone()
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.directory / info.file), framework="pt", device="cpu")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def load_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.load(n) for n in names}

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors of one module subtree, e.g. one decoder block `"model.layers.3"`."""
        return self.load_many(self.names_with_prefix(prefix))

    def close(self) -> None:
        self._handles.clear()
        self._pickle = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_packed_checkpoint(model: torch.nn.Module, out_dir: Path, layer_tensors: tuple[str, ...],
                           dequantize: Callable[[str, dict[str, torch.Tensor]], torch.Tensor]) -> list[str]:
    """Copy every tensor of a saved checkpoint of packed layers (GPTQ, AWQ: `<module>.qweight` and the other
    `layer_tensors`) into `model`: each packed layer through `dequantize(module, tensors)`, which returns the
    weight as `model` holds it, every other tensor as stored. Returns the names of the dequantized modules."""
    reader = CheckpointReader(out_dir)
    try:
        state = model.state_dict()
        names = reader.names()
        packed = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
        for m in packed:
            target = state[m + ".weight"]
            target.copy_(dequantize(m, {s: reader.load(f"{m}.{s}") for s in layer_tensors}).to(target.dtype))
        for n in names:
            if n.rpartition(".")[2] not in layer_tensors and n in state:
                state[n].copy_(reader.load(n).to(state[n].dtype))
        return packed
    finally:
        reader.close()


def raise_if_out_of_space(exc: BaseException, what: str) -> None:
    """Turn ENOSPC/EDQUOT (from an OSError or a library message) into OutOfSpace."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutOfSpace(f"no space left on device while writing {what}") from None
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        raise OutOfSpace(f"no space left on device while writing {what}") from None


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> int:
    """Write one safetensors file, streaming tensor bytes; returns the file size.

    Tensors are ordered by element size (largest first) then name, as safetensors does, so every tensor
    starts aligned to its element size.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for k in order:
        t = tensors[k]
        dtype = TORCH_TO_SAFETENSORS.get(t.dtype)
        if dtype is None:
            raise TypeError(f"cannot store dtype {t.dtype} in safetensors ({k})")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    try:
        with open(path, "wb") as fh:
            fh.write(len(hb).to_bytes(8, "little"))
            fh.write(hb)
            for k in order:
                t = tensors[k]
                if t.numel():
                    fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise_if_out_of_space(exc, path.name)
        raise
    return 8 + len(hb) + offset


def _write_after(copies_done, path: Path, tensors: dict[str, torch.Tensor | Future],
                 metadata: dict[str, str] | None) -> int:
    """`write_safetensors` once the device -> host copies into `tensors` have finished (None: nothing to wait;
    a value that is a Future is a `CopyDrain` copy, waited for here)."""
    if copies_done is not None:
        copies_done.synchronize()
    tensors = {k: v.result() if isinstance(v, Future) else v for k, v in tensors.items()}
    return write_safetensors(path, tensors, metadata)


@dataclass
class WrittenFile:
    name: str
    size: int


class ShardedWriter:
    """Write tensors as they are produced into `directory`, in shards of at most `max_shard_size` bytes.

    Memory is bounded by two shard buffers (plus the tensor being added): a full shard is written to disk on a
    background thread while the next one fills, so the quantization does not wait for the disk (an error of
    that write is raised by the next `flush` or by `close`). A tensor larger than the limit gets a shard of
    its own. `close()` renames the shards to `model-0000k-of-0000N.safetensors` and writes
    `model.safetensors.index.json`, or, for a single shard, names it `model.safetensors` (no index), as
    transformers' `save_pretrained` does. Call it once; the directory should be a staging directory that
    is renamed into place only when the whole output is complete (see `export.StagedOutput`).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = int(max_shard_size)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        self._buffer: dict[str, torch.Tensor | Future] = {}  # a Future: a device tensor on its way (CopyDrain)
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str], int]] = []  # (temp name, tensor names, file size)
        self._names: set[str] = set()
        self.total_size = 0
        self.closed = False
        self.files: list[WrittenFile] = []
        self.weight_map: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[str, list[str], Future] | None = None
        self._copies_pending = False  # device -> host copies into the buffer not yet waited for
        self._drain: CopyDrain | None = None  # device tensors' copies to the host (made at the first one)

    @property
    def buffered_bytes(self) -> int:
        return self._buffer_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        t = tensor.detach()
        n = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + n > self.max_shard_size:
            self.flush()
        if t.device.type == "cuda" and n:
            if self._drain is None:
                self._drain = CopyDrain()
            if self._drain.fits(t):
                # through the reused pinned ring into ordinary memory, on the drain's thread: the quantization
                # neither waits for the copy nor allocates pinned memory per tensor
                self._buffer[name] = self._drain.submit(t)
                self._buffer_bytes += n
                self._names.add(name)
                self.total_size += n
                return
        # into pinned memory of its own without waiting (a tensor too large for the ring, e.g. an embedding):
        # the shard's writer thread waits for the copies (an event recorded at flush)
        t, copying = begin_to_host(t)
        self._copies_pending |= copying
        if t.untyped_storage().nbytes() != n:  # a view into something larger: own its bytes
            t = t.clone()
        self._buffer[name] = t
        self._buffer_bytes += n
        self._names.add(name)
        self.total_size += n

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        """Start writing the buffered tensors as the next shard (no-op when empty), after the previous shard
        is on disk."""
        if not self._buffer:
            return
        self._wait_pending()
        tmp = f".shard-{len(self._shards) + 1:05d}.safetensors.tmp"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        buf = self._buffer
        done = None
        if self._copies_pending:
            done = copies_done()
            self._copies_pending = False
        self._pending = (tmp, list(buf), self._pool.submit(_write_after, done, self.directory / tmp, buf,
                                                           self.metadata))
        self._buffer = {}
        self._buffer_bytes = 0

    def _wait_pending(self) -> None:
        """Wait for the shard being written (its error, e.g. OutOfSpace, is raised here)."""
        if self._pending is None:
            return
        tmp, names, fut = self._pending
        self._pending = None
        self._shards.append((tmp, names, fut.result()))

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._drain is not None:
            self._drain.close()
            self._drain = None

    def close(self) -> list[WrittenFile]:
        """Write the last shard, name the files, write the index; returns the files written."""
        if self.closed:
            return self.files
        try:
            self.flush()
            self._wait_pending()
        finally:
            self._stop_pool()
        if not self._shards:
            self._shards.append((".shard-00001.safetensors.tmp", [], write_safetensors(
                self.directory / ".shard-00001.safetensors.tmp", {}, self.metadata)))
        n = len(self._shards)
        try:
            for k, (tmp, names, size) in enumerate(self._shards, start=1):
                final = SINGLE_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
                os.replace(self.directory / tmp, self.directory / final)
                self.files.append(WrittenFile(final, size))
                for name in names:
                    self.weight_map[name] = final
            if n > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
                data = json.dumps(index, indent=2).encode() + b"\n"
                with open(self.directory / INDEX_NAME, "wb") as fh:
                    fh.write(data)
                self.files.append(WrittenFile(INDEX_NAME, len(data)))
        except OSError as exc:
            raise_if_out_of_space(exc, "the checkpoint index")
            raise
        self.closed = True
        return self.files

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # no thread left writing into a directory the caller is about to remove
            self.abandon()

    def abandon(self) -> None:
        """Wait for a shard being written, ignoring its outcome, and stop the writer thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending[2].result()
            except Exception:  # noqa: BLE001 - the job is failing for another reason already
                pass
        self._stop_pool()
