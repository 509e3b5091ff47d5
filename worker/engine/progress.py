"""How the engine tells its caller where it is, and how the caller stops it.

The engine never knows who listens: the worker's child process forwards these calls as JSON lines
to its parent (which writes the job row and event table), `qaas quantize` draws progress bars, and a
library user may pass nothing at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class JobCancelled(Exception):
    """Raised by `Reporter.check_cancelled` when the caller asked the engine to stop."""


class Reporter(Protocol):
    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        """A new stage begins (resolve, load, calibrate, quantize, evaluate, export)."""

    def progress(
        self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None
    ) -> None:
        """`done` of `total` units of the current stage are finished (e.g. block 17 of 32).

        `metrics` carries per-unit figures such as per-layer quantization error.
        """

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """A note worth keeping in the job's timeline (a retried Cholesky, a skipped layer)."""

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the caller asked to stop. Called between blocks and stages."""


class NullReporter:
    """A reporter that records nothing; cancellation through `cancel()` (thread-safe)."""

    def __init__(self) -> None:
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        pass

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        pass

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise JobCancelled("cancelled")


class ForwardingReporter:
    """A reporter that hands every call to `inner`: the base of the reporters that change one call (a stage
    prefix, stage timing, an offset on the progress count) and forward the rest unchanged."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self.inner.stage(name, total=total, message=message)

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.inner.progress(done, total, message=message, metrics=metrics)

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.inner.log(message, level=level, data=data)

    def check_cancelled(self) -> None:
        self.inner.check_cancelled()


class PhaseTimer:
    """Wall time per named phase of a stage, summed over its repetitions (reported as a job's timings).

    On CUDA the device is synchronized at each boundary, so each phase is charged for its own kernels rather
    than for whatever was still queued when it began."""

    def __init__(self, device: Any, into: dict[str, float]) -> None:
        self.device, self.into, self._started = device, into, {}

    def _sync(self) -> None:
        if getattr(self.device, "type", None) == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def start(self, name: str) -> None:
        self._sync()
        self._started[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._sync()
        self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - self._started.pop(name)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)
