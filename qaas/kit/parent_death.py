"""Children that do not outlive their parent (Linux `PR_SET_PDEATHSIG`).

Used for the engine child of a job attempt (a killed worker must not leave a process holding the GPU)
and for the worker that `qaas up` starts (a killed `qaas up` must not leave a worker consuming jobs).
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when its parent dies."""

    def _set() -> None:  # runs in the child between fork and exec
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except OSError:
            pass  # not Linux: the parent's own clean-up is all there is

    return _set
