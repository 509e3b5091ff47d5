"""A stand-in engine for tests and drain benchmarks: `python -P -m qaas.worker.fake_engine`.

It speaks the real engine's protocol (see `qaas.worker.engine.runner`: a JSON spec on stdin, JSON
lines on stdout, exit 0/2/3, SIGTERM = cooperative cancel) and is started the same way, by the same
supervisor, so everything around the engine (claims, leases, kills, retries, publishing, webhooks)
is exercised for real -- but it only sleeps `options.fake_step_s` per "block" and writes a tiny
output instead of quantizing. It imports no ML library, so a job costs a process start, not a
torch import. Selected by QAAS_FAKE_ENGINE=1, which the settings refuse unless QAAS_ENV=test.

Partial output is written into a `.out.partial-*` staging directory beside `out_dir` while the job
runs (as the real engine does), so tests can check that a killed attempt's leftovers are removed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

BLOCKS = 8
_cancel = threading.Event()


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _check() -> None:
    if _cancel.is_set():
        raise KeyboardInterrupt


def _sleep(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _check()
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    _check()


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: _cancel.set())
    spec = json.loads(sys.stdin.read())
    opts = spec.get("options") or {}
    step = float(opts.get("fake_step_s") or 0.0)
    qc = spec["quantization_config"]
    final = Path(spec["out_dir"])
    stage = None
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        for stage in ("resolve", "load"):
            _emit({"type": "stage", "stage": stage, "total": None, "message": "fake engine"})
            _sleep(step)
        staging.mkdir(parents=True)
        stage = "quantize"
        _emit({"type": "stage", "stage": stage, "total": BLOCKS, "message": "fake engine"})
        _emit({"type": "log", "level": "info", "message": "fake quantization started", "data": {"pid": os.getpid()}})
        for i in range(BLOCKS):
            _sleep(step)
            (staging / f"block-{i}.part").write_bytes(b"\0" * 1024)
            _emit({"type": "progress", "done": i + 1, "total": BLOCKS, "message": f"block {i + 1}/{BLOCKS}",
                   "metrics": {}})
        stage = "export"
        _emit({"type": "stage", "stage": stage, "total": None, "message": "fake engine"})
        for part in staging.glob("*.part"):
            part.unlink()
        config = {"model_type": "fake", "quantization_config": qc}
        (staging / "config.json").write_text(json.dumps(config))
        (staging / "model.safetensors").write_bytes(_tiny_safetensors())
        os.replace(staging, final)
    except KeyboardInterrupt:
        _cleanup(staging)
        _emit({"type": "error", "code": "cancelled", "message": "cancelled by request (SIGTERM)", "stage": stage})
        return 3
    except OSError as exc:
        _cleanup(staging)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _emit({"type": "error", "code": "no_space", "message": "no space left on device while writing the output",
                   "stage": stage})
            return 2
        raise
    files = sorted(({"name": p.name, "size": p.stat().st_size} for p in final.iterdir()), key=lambda f: f["name"])
    _emit({"type": "result", "result": {
        "engine_version": "fake", "method": qc.get("quant_method"), "out_dir": str(final), "files": files,
        "source": {"path": spec["source"].get("path"), "id": spec["source"].get("id"), "revision": None},
        "size_before_bytes": 4096, "size_after_bytes": sum(f["size"] for f in files), "quantization_config": qc,
        "evaluation": None, "notes": ["fake engine: nothing was quantized (QAAS_FAKE_ENGINE, tests only)"],
        "timings": {}, "device": "cpu"}})
    return 0


def _cleanup(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _tiny_safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"\0" * 8


if __name__ == "__main__":
    sys.exit(main())
