"""A Reporter that draws a progress bar per stage on a terminal, and plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from qaas.worker.engine.progress import NullReporter


class TerminalReporter(NullReporter):
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__()
        self.stream = stream
        self.tty = stream.isatty()
        self.bar = None
        self.stage_name: str | None = None
        self.stage_started = time.monotonic()

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self.close()
        self.stage_name, self.stage_started = name, time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, file=self.stream, unit="step", leave=True)
        else:
            print(f"[{name}] {message or 'started'}", file=self.stream, flush=True)

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            if message:
                self.bar.set_postfix_str(message[:60], refresh=False)
            self.bar.refresh()
        else:
            print(f"[{self.stage_name}] {done}/{total} {message}".rstrip(), file=self.stream, flush=True)

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        text = f"[{self.stage_name}] {level}: {message}"
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.stage_name is not None and not self.tty:
            print(f"[{self.stage_name}] done in {time.monotonic() - self.stage_started:.1f}s", file=self.stream, flush=True)
