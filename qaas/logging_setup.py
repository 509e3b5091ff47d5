"""The one logger setup of the service processes: JSON lines (or plain text), with the job's id.

Every record carries the context of the work it belongs to: `job_context(job_id, attempt)` sets
context variables that a filter copies onto each record, so every line a worker writes while it runs
a job -- its own, SQLAlchemy's, Celery's -- has `job_id` (and `attempt`) without each call passing it.
Every message is passed through `qaas.kit.redaction.redact`, which cuts anything shaped like an API key
or a Hub token, as a last line of defence (the code already redacts secrets where it knows them).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from qaas.kit.redaction import redact

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("qaas_job_id", default=None)
attempt_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("qaas_attempt", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextmanager
def job_context(job_id: object, attempt: int | None = None) -> Iterator[None]:
    """Every log record written inside this block (in this thread or context) names the job."""
    t1 = job_id_var.set(str(job_id))
    t2 = attempt_var.set(attempt)
    try:
        yield
    finally:
        job_id_var.reset(t1)
        attempt_var.reset(t2)


def set_attempt(attempt: int) -> None:
    attempt_var.set(attempt)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        if getattr(record, "attempt", None) is None:
            record.attempt = attempt_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pid": record.process,
        }
        if getattr(record, "job_id", None):
            out["job_id"] = record.job_id
            if getattr(record, "attempt", None) is not None:
                out["attempt"] = record.attempt
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and key not in ("job_id", "attempt") and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        return f"{line} [job {record.job_id}]" if getattr(record, "job_id", None) else line


def setup_logging(fmt: str = "json", level: str = "INFO", *, log_file: str | None = None) -> None:
    """Configure the root logger once: one handler on stderr; library loggers propagate to it.

    With `log_file` (`qaas up` in a terminal) every record goes to that file in `fmt`, and only errors
    reach stderr, as plain text: the service's routine lines would otherwise bury what the user must read.
    Python warnings (`warnings.warn`, e.g. Celery's) become log records either way, so they keep the
    format of the stream instead of writing raw text into it.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_qaas", False):
            root.removeHandler(h)
            h.close()
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    if log_file is not None:
        console.setLevel(logging.ERROR)
        console.setFormatter(TextFormatter())
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(formatter)
        handlers: list[logging.Handler] = [console, to_file]
    else:
        handlers = [console]
    for handler in handlers:
        handler._qaas = True  # type: ignore[attr-defined]
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
