"""Child-process entry point: `python -P -m qaas.worker.engine.runner`.

Protocol (the parent is the Celery task; it never touches CUDA):

* stdin: one JSON object `{"source": {...}, "quantization_config": {...}, "out_dir": "...", "options": {...}}`;
  a fine-tuning job's has `"kind": "finetune"` and its `lora`, `training`, `dataset`, `eval_dataset`,
  `checkpoint_dir` and `resume_dir` too (`finetune.pipeline`).
  The Hub token is never in the spec or argv: it comes in the environment variable QAAS_CHILD_HF_TOKEN.
* stdout: JSON lines, and nothing else (library output is redirected to stderr at the file-descriptor level):
    {"type": "stage", "stage": str, "total": int|null, "message": str}
    {"type": "progress", "done": int, "total": int, "message": str, "metrics": {...}}
    {"type": "log", "level": str, "message": str, "data": {...}|null}
  and finally exactly one of
    {"type": "result", "result": {...}}
    {"type": "error", "code": str, "message": str, "stage": str|null, "field": str|null}
  where code is EngineError.code, "cancelled" or "internal_error".
* exit status: 0 success, 2 engine error (user-facing), 3 cancelled, 1 internal error.
* a standby engine (environment QAAS_ENGINE_STANDBY=1, worker/child.py) imports what every job needs first
  (`preload`) and then waits on stdin, whose first line is `{"cwd": str, "log_path": str, "env": {...}}`:
  the directory to run in, the file its stderr goes to from then on, and the variables to set (the Hub
  token); the spec follows as above.
* SIGTERM asks for a cooperative stop: the next `check_cancelled()` (between blocks and stages) raises
  JobCancelled, the staging directory is removed, and the process exits 3. The parent escalates to SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from typing import IO, Any

TOKEN_ENV = "QAAS_CHILD_HF_TOKEN"
STANDBY_ENV = "QAAS_ENGINE_STANDBY"
EXIT_OK, EXIT_INTERNAL, EXIT_ENGINE, EXIT_CANCELLED = 0, 1, 2, 3


def _jsonable(value: Any) -> Any:
    """Replace what JSON cannot carry (NaN/inf, tensors, paths) so that a line always parses."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        return _jsonable(value.item())
    return str(value)


class JsonLinesReporter:
    """A Reporter that writes one JSON object per line to `stream`; cancelled by `cancel()` (signal-safe)."""

    def __init__(self, stream: IO[str], *, secrets: tuple[str, ...] = ()) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._secrets = tuple(s for s in secrets if s)
        self.current_stage: str | None = None

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(_jsonable(event), separators=(",", ":"))
        for s in self._secrets:  # belt and braces: the token never leaves the process
            line = line.replace(s, "***")
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def cancel(self) -> None:
        self._cancelled.set()

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self.current_stage = name
        self.emit({"type": "stage", "stage": name, "total": total, "message": message})

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.emit({"type": "progress", "done": done, "total": total, "message": message, "metrics": metrics or {}})

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.emit({"type": "log", "level": level, "message": message, "data": data})

    def check_cancelled(self) -> None:
        from .progress import JobCancelled

        if self._cancelled.is_set():
            raise JobCancelled("cancelled by request (SIGTERM)")


def _claim_stdout() -> IO[str]:
    """Keep the real stdout for the protocol and point fd 1 at stderr for everything else."""
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", buffering=1, encoding="utf-8")


def preload() -> None:
    """Import what every job imports before its first stage: torch, the engine with its methods, and transformers'
    model machinery (a one-layer Llama built on the meta device pulls in the lazily imported modules: modeling,
    generation, the integrations they load). A failure here is left for the job to meet."""
    try:
        import torch
        import transformers

        from . import pipeline  # noqa: F401
        from .finetune import pipeline as finetune_pipeline  # noqa: F401

        tiny = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=128)
        with torch.device("meta"):
            transformers.AutoModelForCausalLM.from_config(tiny)
    except Exception:  # noqa: BLE001 - the job reports whatever it meets itself
        traceback.print_exc(file=sys.stderr)


def _take_job_place() -> None:
    """A standby engine's first stdin line: run in `cwd`, write stderr (and stray stdout) to `log_path` from now
    on, with `env` set."""
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(EXIT_INTERNAL)  # the worker went away before handing over a job
    where = json.loads(line)
    os.chdir(where["cwd"])
    sys.stderr.flush()
    log_fd = os.open(where["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.dup2(log_fd, 1)  # fd 1 is stderr's since _claim_stdout
    os.close(log_fd)
    os.environ.update({str(k): str(v) for k, v in (where.get("env") or {}).items()})


def main() -> int:
    proto = _claim_stdout()
    if os.environ.pop(STANDBY_ENV, None) == "1":
        preload()
        _take_job_place()
    token = os.environ.pop(TOKEN_ENV, None) or None
    reporter = JsonLinesReporter(proto, secrets=(token,) if token else ())
    signal.signal(signal.SIGTERM, lambda signum, frame: reporter.cancel())
    signal.signal(signal.SIGINT, lambda signum, frame: reporter.cancel())

    def fail(code: str, message: str, field: str | None = None) -> None:
        reporter.emit({"type": "error", "code": code, "message": message,
                       "stage": reporter.current_stage, "field": field})

    # Everything past this point imports torch; errors are reported through the protocol.
    from .errors import EngineError, InvalidConfig
    from .progress import JobCancelled

    try:
        try:
            spec = json.loads(sys.stdin.read())
            if not isinstance(spec, dict):
                raise ValueError("the spec must be a JSON object")
            for key in ("source", "quantization_config", "out_dir"):
                if key not in spec:
                    raise InvalidConfig(f"spec is missing {key!r}", field=key)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidConfig(f"cannot read the job spec from stdin: {exc}") from None
        from .options import EngineOptions
        from .pipeline import quantize

        opts = dict(spec.get("options") or {})
        if "hub_token" in opts:
            raise InvalidConfig("the Hub token must come in the environment, not in the spec", field="options.hub_token")
        options = EngineOptions.from_dict(opts)
        options.hub_token = token
        if spec.get("kind") == "finetune":
            from .finetune.pipeline import finetune

            result = finetune(spec, options=options, reporter=reporter)
        else:
            result = quantize(spec["source"], spec["quantization_config"], spec["out_dir"], options=options,
                              reporter=reporter)
    except JobCancelled as exc:
        fail("cancelled", str(exc) or "cancelled")
        return EXIT_CANCELLED
    except EngineError as exc:
        fail(exc.code, exc.message, exc.field)
        return EXIT_ENGINE
    except MemoryError:
        fail("internal_error", "out of memory")
        return EXIT_INTERNAL
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        fail("internal_error", f"{type(exc).__name__}: {exc}"[:2000])
        return EXIT_INTERNAL
    reporter.emit({"type": "result", "result": result})
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    sys.exit(code)
