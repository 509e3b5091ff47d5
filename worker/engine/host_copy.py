"""Device -> host copies that do not make the host wait.

A pageable `tensor.cpu()` blocks the host for the whole copy (and the kernels queued before it); a writer that
gets a pinned-memory copy started with `begin_to_host` plus an event recorded after it (`copies_done`) lets the
host go on launching the next tensor's work while the copy engine and the writer thread finish this one. Pinned
blocks come from torch's caching host allocator, so a steady stream of same-sized tensors reuses them.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

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


class PinnedRing:
    """One pinned buffer, allocated once, that device -> host copies are staged through in order.

    Pinned memory is slow to allocate (cudaHostAlloc: on the H200 machine the 70B GPTQ block spent ~0.2 s of
    idle device in `torch.empty(pin_memory=True)` for its ~0.45 GB of packed tensors), and torch's pinned cache
    only recycles a block once its tensor is freed, which a checkpoint writer does a whole shard (5 GB) later.
    `stage` copies a tensor into the next free region without waiting for the device; whoever finishes the copy
    (`CopyDrain`) moves the bytes to ordinary memory and `release`s the region, oldest first. `stage` waits when
    the ring is full, so the host memory the copies hold is bounded by `capacity`."""

    ALIGN = 512

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # pinned where there is a device to copy from (the ring's logic runs on the CPU too: tests)
        self.buf = torch.empty(capacity, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self._live: deque[tuple[int, int]] = deque()
        self._head = 0
        self._cv = threading.Condition()

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= self.capacity // 2

    def stage(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(the pinned view the copy of `t` lands in, its region); the copy may still be running."""
        n = t.numel() * t.element_size()
        size = -(-max(n, 1) // self.ALIGN) * self.ALIGN
        with self._cv:
            while True:
                start = self._head if self._head + size <= self.capacity else 0
                if not any(s < start + size and start < e for s, e in self._live):
                    break
                self._cv.wait()
            region = (start, start + size)
            self._live.append(region)
            self._head = start + size
        view = self.buf[start:start + n].view(t.dtype).view(t.shape)
        view.copy_(t.contiguous(), non_blocking=True)
        return view, region

    def release(self, region: tuple[int, int]) -> None:
        with self._cv:
            self._live.remove(region)
            self._cv.notify_all()


class CopyDrain:
    """Device tensors to ordinary host memory without the host waiting: `submit(t)` stages `t` through a
    `PinnedRing` and returns a future of its host copy, made on a thread of the drain's own (the event wait
    and the copy release the GIL)."""

    def __init__(self, capacity: int = 512 << 20) -> None:
        self.ring = PinnedRing(capacity)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2h-drain")

    def fits(self, t: torch.Tensor) -> bool:
        return self.ring.fits(t)

    def submit(self, t: torch.Tensor) -> Future:
        view, region = self.ring.stage(t)
        done = copies_done() if t.device.type == "cuda" else None

        def finish() -> torch.Tensor:
            try:
                if done is not None:
                    done.synchronize()
                return view.clone()
            finally:
                self.ring.release(region)

        return self._thread.submit(finish)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
