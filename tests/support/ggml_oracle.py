"""ggml's own quantizer and llama.cpp's own model quantizer, as test oracles (from the installed llama-cpp-python).

* `ggml_quantize(type_name, rows, imatrix=None)`: `ggml_quantize_chunk` of `llama_cpp/lib/libggml-base.so`
  through ctypes: the bytes llama-quantize writes for one tensor of float32 rows;
* `llama_model_quantize(src, dst, ftype_name)`: `llama_cpp.llama_model_quantize` of a GGUF file, as
  `llama-quantize SRC DST TYPE` does it.
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


def llama_model_quantize(src: Path, dst: Path, ftype_name: str, nthread: int = 2,
                         imatrix: dict[str, np.ndarray] | None = None) -> None:
    """`llama-quantize [--imatrix] src dst TYPE` (ftype_name as llama.cpp spells it: "Q4_K_M", "Q8_0");
    `imatrix`: per tensor name, the importance of each column (what llama-quantize reads from the file)."""
    llama_cpp = require("llama_cpp")
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype_name}"])
    params.nthread = nthread
    if imatrix is not None:
        keep = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32)) for name, v in imatrix.items()]
        entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
        for e, (name, v) in zip(entries, keep):
            e.name, e.data, e.size = name, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        entries[len(keep)].name = None  # the list ends with a null name
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed: {rc}"
