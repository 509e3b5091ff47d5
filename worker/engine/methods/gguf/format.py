"""GGUF files: one per requested type, all written in the same single pass over the source.

Each `GGUFOutput` knows its tensors' types and sizes before any data is read (GGUF puts the tensor table
before the data), so it writes header, metadata and table first and then takes each tensor's bytes as they
come, in llama.cpp's loader order; `gguf.GGUFWriter` splits the file into `-0000i-of-0000N.gguf` parts when
a size limit is set.

Metadata, as llama.cpp's own tools write it:
  * the conversion's float file (F16/BF16/F32) carries convert_hf_to_gguf.py's keys in its order;
  * a quantized file carries the same keys with `general.quantization_version` and `general.file_type` last,
    as llama-quantize rewrites them, so that our file is the one `llama-quantize F16.gguf OUT TYPE` makes;
    made with an importance matrix, it ends with the `quantize.imatrix.*` keys `llama-quantize --imatrix`
    adds (`quantize_keys`);
  * split parts (`split_max_size`) are gguf-py's, as convert_hf_to_gguf.py --split-max-size writes them:
    `model-<TYPE>-0000i-of-0000N.gguf` (llama.cpp's llama_split_path names), every key in the first part,
    each part with `split.no` (UINT16), `split.count` (UINT16) and `split.tensors.count` (INT32), the keys
    llama.cpp's model loader reads to find and check the other parts; whole tensors per part, a new part
    started when the next tensor's bytes would take the part's tensor bytes past the limit. A file within
    the limit keeps its unsplit name, as the converter leaves it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qaas.kernels.gguf import FLOAT_TYPES, row_bytes

from ...host_copy import begin_to_host, copies_done
from .convert import PlannedTensor, add_hparams, add_model_metadata, graph
from .vocab import Vocab


def file_type_id(type_name: str) -> int:
    return int(gguf.LlamaFileType.ALL_F32 if type_name == "F32" else gguf.LlamaFileType[f"MOSTLY_{type_name}"])


@dataclass
class WrittenGGUF:
    type: str
    files: list[Path]
    tensor_bytes: int
    n_elements: int
    tensor_types: dict[str, str]
    #: sha256 of each file, by name (computed when the output is closed)
    sha256: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        sizes = {p.name: p.stat().st_size for p in self.files}
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return {
            "type": self.type,
            "files": [{"name": n, "size": s, "sha256": self.sha256.get(n) or _sha256(p)}
                      for (n, s), p in zip(sizes.items(), self.files)],
            "size": sum(sizes.values()),
            # as llama-quantize reports it: the tensors' bytes over their weights
            "bits_per_weight": round(self.tensor_bytes * 8 / self.n_elements, 4),
            "tensor_types": dict(sorted(counts.items())),
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class _FollowingHash:
    """sha256 of a file while it is appended to: `catch_up` hashes the bytes written to it since the last call,
    read back from the page cache on the output's thread between its writes (beside the device's work), so
    closing the output hashes only the file's tail instead of the whole file after the last write.

    Sound because gguf's writer only appends (header, metadata, tensor table, then each tensor with its
    padding; it never seeks back): bytes below the file's current size never change again."""

    CHUNK = 8 << 20

    def __init__(self, path: Path) -> None:
        self.path, self.hash, self.done = path, hashlib.sha256(), 0

    def catch_up(self) -> None:
        with open(self.path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            while self.done < size:
                chunk = os.pread(fh.fileno(), min(self.CHUNK, size - self.done), self.done)
                if not chunk:
                    break
                self.hash.update(chunk)
                self.done += len(chunk)

    def hexdigest(self) -> str:
        self.catch_up()
        return self.hash.hexdigest()


class GGUFOutput:
    """One output type: `model-<TYPE>.gguf` (or its parts), opened with every tensor's type known.

    Tensor data is written by a thread of the output's own (`write` returns at once; the order is kept), so the
    disk writes of all outputs overlap each other and the next tensor's quantization on the device; a device
    tensor's bytes come over by a pinned, non-blocking copy that the thread waits for, not the host. The thread
    also hashes each file as it grows (`_FollowingHash`), so that closing an output hashes only its tail (hashlib,
    file writes and the event wait release the GIL)."""

    #: tensors handed over and not yet written, per output: bounds the host memory held for the writer
    MAX_PENDING = 2

    def __init__(self, directory: Path, type_name: str, planned: list[PlannedTensor], types: dict[str, str],
                 *, config: dict[str, Any], vocab: Vocab, source_dir: Path, model_name: str | None,
                 split_bytes: int | None, quantize_keys: list[tuple[str, Any, Any]] = ()) -> None:
        self.type_name, self.types = type_name, types
        self.path = directory / f"model-{type_name}.gguf"
        arch = graph(config)
        w = gguf.GGUFWriter(None, arch.name, split_max_size=split_bytes or 0)
        self.tensor_bytes = self.n_elements = 0
        for t in planned:
            ttype = types[t.name]
            nbytes = row_bytes(ttype, t.shape[-1]) * (t.n_elements // t.shape[-1])
            qtype = gguf.GGMLQuantizationType[ttype]
            if ttype == "F32":
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes)
            elif ttype == "F16":
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float16), nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            self.tensor_bytes += nbytes
            self.n_elements += t.n_elements
        add_model_metadata(w, source_dir, model_name, w.get_total_parameter_count()[0])
        add_hparams(w, config, file_type_id(type_name))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w, source_dir, arch.arch)
        if type_name not in FLOAT_TYPES:
            kv = w.kv_data[0]
            for key in (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE):
                kv[key] = kv.pop(key)
            for key, value, vtype in quantize_keys:  # after file_type, where llama-quant.cpp sets its overrides
                w.add_key_value(key, value, vtype)
        w.write_header_to_file(path=self.path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.writer = w
        self.paths = [Path(p) for p in w.format_shard_names(self.path)] if len(w.tensors) > 1 else [self.path]
        self._hashes = [_FollowingHash(p) for p in self.paths]
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gguf-{type_name}")
        self._pending: list[Future] = []

    def write(self, data: torch.Tensor | np.ndarray) -> None:
        """The next tensor's bytes (uint8, or float32/float16 values; on the device or the host), in table order;
        written in the background (a write error is raised by a later `write` or by `close`)."""
        self.wait_for_room()
        copied = None
        if isinstance(data, torch.Tensor):
            data, copying = begin_to_host(data.detach())
            copied = copies_done() if copying else None
        self._pending.append(self._thread.submit(self._write_tensor, data, copied))

    def wait_for_room(self) -> None:
        """Until fewer than MAX_PENDING tensors wait for the writer thread (the host memory held is bounded)."""
        while len(self._pending) >= self.MAX_PENDING:
            self._pending.pop(0).result()

    def _write_tensor(self, data: torch.Tensor | np.ndarray, copied: torch.cuda.Event | None) -> None:
        if copied is not None:
            copied.synchronize()
        self.writer.write_tensor_data(np.ascontiguousarray(data.numpy() if isinstance(data, torch.Tensor) else data))
        for h in self._hashes:
            h.catch_up()

    def close_async(self) -> Future:
        """Every pending write, then the file closed and hashed, on the output's thread: a future of the
        `WrittenGGUF`."""
        return self._thread.submit(self._finish)

    def close(self) -> WrittenGGUF:
        return self.close_async().result()

    def abandon(self) -> None:
        """The job stops before the file is complete: queued writes dropped, the running one finished, the file
        closed (the staging directory it is in is discarded)."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        self.writer.close()

    def _finish(self) -> WrittenGGUF:
        try:
            for f in self._pending:  # all done before this task ran (one thread); re-raise a write error
                f.result()
            self.writer.close()
            hashes = {h.path.name: h.hexdigest() for h in self._hashes}
            return WrittenGGUF(self.type_name, self.paths, self.tensor_bytes, self.n_elements, dict(self.types),
                               sha256=hashes)
        finally:
            self._thread.shutdown(wait=False)
