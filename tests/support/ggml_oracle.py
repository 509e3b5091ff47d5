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


def llama_model_quantize(src: Path, dst: Path, ftype_name: str, nthread: int = 2) -> None:
    """`llama-quantize src dst TYPE` (ftype_name as llama.cpp spells it: "Q4_K_M", "Q8_0")."""
    llama_cpp = require("llama_cpp")
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype_name}"])
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype_name}) failed: {rc}"
