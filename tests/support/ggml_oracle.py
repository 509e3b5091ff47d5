"""ggml's own quantizer and llama.cpp's own model quantizer, as test oracles (from the installed llama-cpp-python).

* `ggml_quantize(type_name, rows, imatrix=None)`: `ggml_quantize_chunk` of `llama_cpp/lib/libggml-base.so`
  through ctypes: the bytes llama-quantize writes for one tensor of float32 rows;
* `llama_model_quantize(src, dst, ftype_name)`: `llama_cpp.llama_model_quantize` of a GGUF file, as
  `llama-quantize SRC DST TYPE` does it; with `imatrix_args(path, as_given)`, as `llama-quantize --imatrix
  <as_given> SRC DST TYPE` does it (the importance matrix and the metadata that tool adds).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

from support.consumers import require


@lru_cache(maxsize=1)
def libggml_base() -> ctypes.CDLL:
    llama_cpp = require("llama_cpp")
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(type_name: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The bytes (uint8, [n_rows, row_bytes]) ggml writes for float32 `rows` [n_rows, n_per_row] in that type."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    lib = libggml_base()
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.zeros((n_rows, row_bytes), dtype=np.uint8)
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n_per_row,)
        qw = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, qw)
    assert written == out.nbytes, (written, out.nbytes)
    return out


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """An imatrix.gguf as llama-quantize reads it: per tensor name, in_sum2 / counts in float32."""
    import gguf

    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors}
    return {name[: -len(".in_sum2")]: (v.reshape(-1) / tensors[name[: -len(".in_sum2")] + ".counts"].reshape(-1)[0])
            .astype(np.float32) for name, v in tensors.items() if name.endswith(".in_sum2")}


def imatrix_args(path: Path, as_given: str) -> dict:
    """What tools/quantize/quantize.cpp hands llama_model_quantize for `--imatrix <as_given>` naming the
    imatrix.gguf at `path`: the importance of each column per tensor, and the metadata overrides it builds from
    the file -- quantize.imatrix.file (the name as given), .dataset (the file's first imatrix.datasets),
    .entries_count (the entries loaded), .chunks_count (imatrix.chunk_count, when positive). Keyword arguments
    of `llama_model_quantize`."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    imatrix = read_imatrix(path)
    overrides: list[tuple[str, str | int]] = [("quantize.imatrix.file", as_given)]
    datasets = fields["imatrix.datasets"].contents() if "imatrix.datasets" in fields else []
    if datasets:
        overrides.append(("quantize.imatrix.dataset", datasets[0]))
    overrides.append(("quantize.imatrix.entries_count", len(imatrix)))
    chunks = fields["imatrix.chunk_count"].contents() if "imatrix.chunk_count" in fields else 0
    if chunks > 0:
        overrides.append(("quantize.imatrix.chunks_count", chunks))
    return {"imatrix": imatrix, "kv_overrides": overrides}


def llama_model_quantize(src: Path, dst: Path, ftype_name: str, nthread: int = 2,
                         imatrix: dict[str, np.ndarray] | None = None,
                         kv_overrides: list[tuple[str, str | int]] = ()) -> None:
    """`llama-quantize [--imatrix] src dst TYPE` (ftype_name as llama.cpp spells it: "Q4_K_M", "Q8_0");
    `imatrix`: per tensor name, the importance of each column (what llama-quantize reads from the file);
    `kv_overrides`: (key, str or int) metadata that llama-quant.cpp writes after general.file_type (an int as
    UINT32), as `--override-kv` and `--imatrix` pass them."""
    llama_cpp = require("llama_cpp")
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype_name}"])
    params.nthread = nthread
    if kv_overrides:
        kvs = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        for o, (key, value) in zip(kvs, kv_overrides):
            o.key = key.encode()
            if isinstance(value, str):
                o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            else:
                o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        kvs[len(kv_overrides)].key = b""  # the list ends with an empty key
        params.kv_overrides = ctypes.cast(kvs, type(params.kv_overrides))
    if imatrix is not None:
        keep = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in imatrix.items()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, v) in zip(entries, keep):
            e.name, e.data, e.size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        entries[len(keep)].name = None  # the list ends with a null name
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed: {rc}"
