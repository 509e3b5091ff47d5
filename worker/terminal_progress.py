"""The engine's reporter for `qaas quantize`: a progress bar per stage on a terminal, plain lines otherwise.

Used as a `with` block around the run. Inside it, what the libraries underneath print on their own
(transformers' logger, e.g. "Token indices sequence length is longer than ...", and Python warnings) goes
through `log()` as a line of its own above the bars, instead of into the middle of the bar line, and
transformers' and huggingface_hub's own progress bars are off (a second bar would fight the stage's bar).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from qaas.kit.stage_bars import StageBars
from qaas.worker.engine.progress import NullReporter


class _ToReporter(logging.Handler):
    """Library log records (warnings and worse) as reporter log lines."""

    def __init__(self, reporter: "TerminalReporter") -> None:
        super().__init__(logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not end the job
            message = str(record.msg)
        self.reporter.log(message.strip(), level=record.levelname.lower())


class TerminalReporter(NullReporter):
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        super().__init__()
        self.bars = StageBars(stream)
        self._handler = _ToReporter(self)

    def __enter__(self) -> "TerminalReporter":
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # transformers writes to stderr itself unless told otherwise
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()
        disable_progress_bars()
        logging.captureWarnings(True)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging

        self.bars.end(failed=exc_type is not None)
        logging.getLogger().removeHandler(self._handler)
        logging.captureWarnings(False)
        enable_progress_bars()
        hf_logging.enable_progress_bar()
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()

    def stage(self, name: str, *, total: int | None = None, message: str = "") -> None:
        self.bars.start(name, total=total, message=message)

    def progress(self, done: int, total: int, *, message: str = "", metrics: dict[str, Any] | None = None) -> None:
        self.bars.update(done, total, message)

    def log(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.bars.note(f"[{self.bars.stage or 'qaas'}] {level}: {message}")
