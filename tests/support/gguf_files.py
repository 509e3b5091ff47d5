"""Reading GGUF files in tests, and running a GGUF job through the engine on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_gguf_job(source: Path, out: Path, types: list[str], **fields) -> dict:
    """The engine's result for `{"quant_method": "gguf", "types": types, **fields}` on a local model."""
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    return quantize({"path": str(source)}, {"quant_method": "gguf", "types": types, **fields}, out,
                    options=EngineOptions(device="cpu", allowed_roots=(str(source.parent),), evaluate=False))


def gguf_fields(path: Path) -> dict:
    """Every metadata key's value, in file order (the GGUF header's own fields left out)."""
    import gguf

    return {key: f.contents() for key, f in gguf.GGUFReader(path).fields.items() if not key.startswith("GGUF.")}


def gguf_tensors(path: Path) -> dict:
    """name -> (ggml type, shape, bytes) of every tensor."""
    import gguf

    return {t.name: (t.tensor_type.name, [int(s) for s in t.shape], np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors}


def assert_same_gguf(ours: Path, theirs: Path) -> dict:
    """The same metadata (keys in the same order) and the same tensors (types, shapes, bytes), in any tensor
    order; returns our tensors."""
    a_fields, b_fields = gguf_fields(ours), gguf_fields(theirs)
    differing = {k: (str(a_fields.get(k))[:200], str(b_fields.get(k))[:200])
                 for k in {*a_fields, *b_fields} if a_fields.get(k) != b_fields.get(k)}
    assert not differing, differing  # key: (ours, theirs)
    assert list(a_fields) == list(b_fields), (list(a_fields), list(b_fields))
    a, b = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], name
    return a
