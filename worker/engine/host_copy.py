"""Device -> host copies that do not make the host wait.

A pageable `tensor.cpu()` blocks the host for the whole copy (and the kernels queued before it); a writer that
gets a pinned-memory copy started with `begin_to_host` plus an event recorded after it (`copies_done`) lets the
host go on launching the next tensor's work while the copy engine and the writer thread finish this one. Pinned
blocks come from torch's caching host allocator, so a steady stream of same-sized tensors reuses them.
"""

from __future__ import annotations

import torch


def begin_to_host(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`t`'s values on the host, contiguous: (host tensor, whether a copy into it may still be running).

    A CUDA tensor goes into pinned memory by a non-blocking copy: read the host tensor only after an event
    recorded later on the same stream (`copies_done`) has completed."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.contiguous(), non_blocking=True)
        return host, True
    return (t if t.device.type == "cpu" else t.cpu()).contiguous(), False


def copies_done() -> torch.cuda.Event:
    """An event on the current stream after every copy started so far (`.synchronize()` waits for them)."""
    done = torch.cuda.Event()
    done.record()
    return done
