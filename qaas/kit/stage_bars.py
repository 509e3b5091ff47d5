"""Progress on a terminal: one bar per stage, redrawn in place, with notes printed on their own lines above
it; on a pipe or a file, plain lines instead (one when a stage starts and ends, progress at most once a second).

Shared by `qaas quantize` (the engine's reporter calls) and `qaas submit/status --follow` (a job's event
stream), so a job reads the same in both. Standard library only: the terminal client installs no ML stack.

A stage announced without a count (resolving or loading a model is one step) shows no count while it
runs and a full bar when it ends; a count that arrives with the first progress update is taken from there.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

CLEAR_LINE = "\x1b[K"
REDRAW_EVERY_S = 0.1  # a terminal bar; plain lines are written at most once a second
LINE_EVERY_S = 1.0


def seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


class StageBars:
    def __init__(self, stream: TextIO, *, tty: bool | None = None, columns: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.columns = columns
        self.clock = clock
        self.stage: str | None = None
        self.total: int | None = None
        self.done = 0
        self.message = ""
        self.extra = ""
        self.started = 0.0
        self.last_drawn = float("-inf")
        self.drawn = False  # a bar is on the current terminal line

    # --- the stage ---------------------------------------------------------------------------------

    def start(self, stage: str, *, total: int | None = None, message: str = "") -> None:
        self.end()
        self.stage, self.total, self.done, self.extra = stage, total if total and total > 0 else None, 0, ""
        self.message = message if message != stage else ""
        self.started = self.clock()
        if self.tty:
            self._draw()
        else:
            self._write_line(f"[{stage}] started" + (f": {self.message}" if self.message else ""))

    def update(self, done: int, total: int | None, message: str = "", extra: str = "") -> None:
        if self.stage is None:
            return
        if isinstance(total, int) and total > 0:
            self.total = total
        self.done = done if isinstance(done, int) else self.done
        self.message, self.extra = message or self.message, extra
        final = self.total is not None and self.done >= self.total
        now = self.clock()
        if self.tty:
            if final or now - self.last_drawn >= REDRAW_EVERY_S:
                self._draw()
        elif final or now - self.last_drawn >= LINE_EVERY_S:
            self.last_drawn = now
            self._write_line(f"[{self.stage}] {self._count()}" + (f" {self.message}" if self.message else "")
                             + self.extra)

    def end(self, *, failed: bool = False) -> None:
        """The current stage is over: its bar is drawn once more, complete (or as far as it got), and left."""
        if self.stage is None:
            return
        took = seconds(self.clock() - self.started)
        if self.tty:
            self._draw(final=f"stopped after {took}" if failed else f"done in {took}", complete=not failed)
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
        else:
            self._write_line(f"[{self.stage}] {'stopped after' if failed else 'done in'} {took}")
        self.stage = None

    def note(self, text: str) -> None:
        """A line of its own (a warning, a status), above the bar that is being drawn."""
        if self.drawn:
            self.stream.write("\r" + CLEAR_LINE)
        self.stream.write(text + "\n")
        self.stream.flush()
        if self.drawn:
            self._draw()

    # --- drawing -----------------------------------------------------------------------------------

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done}" if self.done else "…"
        return f"{self.done}/{self.total} {int(100 * min(self.done, self.total) / self.total):3d}%"

    def _draw(self, final: str | None = None, complete: bool = False) -> None:
        columns = self.columns or shutil.get_terminal_size((100, 24)).columns
        width = max(10, min(30, columns - 70))
        if self.total:
            frac = min(1.0, self.done / self.total)
        else:  # an uncounted stage is one step: empty while it runs, full once it is done
            frac = 1.0 if complete else 0.0
        fill = int(frac * width)
        count = self._count() if self.total or not complete else ""
        elapsed = self.clock() - self.started
        if final is not None:
            tail = final
        else:
            tail = seconds(elapsed)
            if self.total and 0 < self.done < self.total:
                tail += f", ~{seconds(elapsed * (self.total - self.done) / self.done)} left"
            if self.message:
                tail += f"  {self.message}"
        text = f"{self.stage:>9} |{'█' * fill}{' ' * (width - fill)}| {count + ' ' if count else ''}{tail}{self.extra}"
        self.stream.write("\r" + text[: columns - 1] + CLEAR_LINE)
        self.stream.flush()
        self.drawn = True
        self.last_drawn = self.clock()

    def _write_line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
