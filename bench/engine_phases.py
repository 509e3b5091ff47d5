"""Named phases inside the engine, for the benchmarks, without changing the engine: each phase is a set of
engine functions (found by name wherever they live under `qaas.`), wrapped for the duration of a run.

Two wrappers: `timed` (wall time per phase, CUDA synchronized at the boundaries: for coarse phases only)
and `ranged` (a `torch.profiler.record_function` range "phase: <label>", no synchronization: the profile
attributes each kernel to the innermost phase whose range was open when the kernel was launched).

A phase whose function cannot be found is an error, not a silent gap in the profile: when the engine
renames or moves a function, update the table here.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

#: the GPTQ job, phase by phase (innermost wins: the Hessian update runs inside the calibration forward's hooks,
#: the Cholesky inside gptq_quantize)
GPTQ_PHASES = {
    "CheckpointReader.load_prefix": "load",
    "materialize_block": "load",
    "BlockRunner.collect": "forward (calibration passes)",
    "HessianAccumulator.add": "Hessian accumulation",
    "HessianAccumulator.finalize": "Hessian accumulation",
    "gptq_quantize": "column loop (GPTQ)",
    "inverse_hessian_factor": "Cholesky + inverse",
    "relative_error": "layer metrics",
    "output_error": "layer metrics",
    "pack_layer": "pack + write",
    "ShardedWriter.add": "pack + write",
    "BlockRunner.forward_all": "forward (quantized block)",
}
#: the evaluation: beside the quantization (GPTQ's default: the windows through each block the job holds, the
#: heads in the evaluate stage), or with eval_read_back both passes streamed after it (original, then the
#: exported files read back); the windows' block passes and heads are common to both
EVAL_PHASES = {
    "StreamedEvaluator.run": "eval: streamed passes (read back)",
    "StreamedEvaluator.start": "eval: windows to the first block",
    "StreamedEvaluator.through": "eval: windows through the blocks",
    "StreamedEvaluator.head": "eval: head (logits, NLL)",
    "GPTQMethod.read_back_weight": "eval: read back quantized layers",
}
PREFIX = "phase: "


def _engine_modules() -> list[Any]:
    import qaas.worker.engine.pipeline  # noqa: F401  (loads the shared engine modules)
    from qaas.worker.engine.methods.base import METHODS, get_method

    for name in METHODS:
        try:
            get_method(name)  # loads each method's modules
        except Exception:  # a method whose optional dependencies are missing has no phases to wrap
            pass
    return [m for n, m in list(sys.modules.items()) if (n == "qaas" or n.startswith("qaas.")) and m is not None]


@contextmanager
def instrument(phases: dict[str, str], wrap: Callable[[str, Callable], Callable]):
    """Within the block, every function or method named in `phases` ("func" or "Class.method") is replaced by
    `wrap(label, original)` wherever a loaded qaas module refers to it."""
    modules = _engine_modules()
    undo: list[tuple[Any, str, Any]] = []
    done: set[tuple[int, str]] = set()  # (object, attribute) already wrapped: a module may hold one under two names
    try:
        for qualname, label in phases.items():
            cls_name, _, attr = qualname.rpartition(".")
            found = False
            for mod in modules:
                for obj in list(vars(mod).values()):
                    if (id(obj), attr) in done:
                        continue
                    if cls_name and isinstance(obj, type) and obj.__name__ == cls_name \
                            and obj.__module__ == mod.__name__ and attr in vars(obj):
                        orig = vars(obj)[attr]
                        undo.append((obj, attr, orig))
                        setattr(obj, attr, wrap(label, orig))
                        done.add((id(obj), attr))
                        found = True
                    elif not cls_name and callable(obj) and getattr(obj, "__name__", None) == attr \
                            and getattr(obj, "__module__", None) == mod.__name__:
                        wrapped = wrap(label, obj)
                        done.add((id(obj), attr))
                        for user in modules:  # every `from x import func` copy
                            for k, v in list(vars(user).items()):
                                if v is obj:
                                    undo.append((user, k, v))
                                    setattr(user, k, wrapped)
                        found = True
            if not found:
                raise LookupError(f"engine function {qualname!r} not found: update bench/engine_phases.py")
        yield
    finally:
        for owner, attr, orig in reversed(undo):
            setattr(owner, attr, orig)


def ranged(label: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with torch.profiler.record_function(PREFIX + label):
            return fn(*args, **kwargs)

    return inner


class PhaseTimer:
    """Wall seconds per phase label, CUDA synchronized before and after each call (a call inside another call
    of the same label counts once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._open: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if self._open[label]:
                return fn(*args, **kwargs)
            _sync()
            self._open[label] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                self._open[label] -= 1
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return inner


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
