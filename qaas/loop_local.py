"""Objects that belong to one asyncio event loop: connection pools, async engines, the dispatcher.

Async connections, futures and tasks are bound to the loop that made them. A server has one loop per
process, but each FastAPI TestClient (and each `asyncio.run`) brings its own, so such objects are kept
per (loop, key) and those of loops that have closed are forgotten.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopLocal(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[tuple[int, Hashable], tuple[asyncio.AbstractEventLoop, T]] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The running loop's object for `key`, made on first use."""
        loop = asyncio.get_running_loop()
        hit = self._items.get((id(loop), key))
        if hit is not None and hit[0] is loop:
            return hit[1]
        for k, (lp, _obj) in list(self._items.items()):  # forget the objects of loops that are gone
            if lp.is_closed():
                del self._items[k]
        obj = make()
        self._items[(id(loop), key)] = (loop, obj)
        return obj

    def values(self) -> list[T]:
        """Every loop's object (a process-wide view, e.g. of the caches' state)."""
        return [obj for _lp, obj in list(self._items.values())]

    def pop_running(self) -> list[T]:
        """Remove and return the running loop's objects (to close them at shutdown)."""
        loop = asyncio.get_running_loop()
        mine = [k for k, (lp, _obj) in self._items.items() if lp is loop]
        return [self._items.pop(k)[1] for k in mine]
