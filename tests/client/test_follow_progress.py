"""What `qaas submit/status --follow` draws from a job's event stream, on a terminal and on a pipe."""

from __future__ import annotations

import io

from qaas.client_cli import Progress
from qaas.kit.stage_bars import StageBars
from support.terminal import screen

# A bitsandbytes job's stream as the API sends it (trimmed): stages without a count, a counted one, a
# warning in the middle of it, the end.
EVENTS = [
    ("status", {"message": "running on w (attempt 1)", "data": {"status": "running"}}),
    ("stage", {"stage": "resolve", "message": "/models/stories260K"}),
    ("stage", {"stage": "load", "message": "load"}),
    ("stage", {"stage": "quantize", "message": "quantize"}),
    ("progress", {"stage": "quantize", "message": "block 1/2", "data": {"done": 1, "total": 2,
                                                                     "metrics": {"max_rel_error": 0.12}}}),
    ("log", {"stage": "quantize", "message": "lm_head kept in float16", "data": {"level": "warning"}}),
    ("progress", {"stage": "quantize", "message": "block 2/2", "data": {"done": 2, "total": 2}}),
    ("stage", {"stage": "export", "message": "export"}),
    ("status", {"message": "succeeded", "data": {"status": "succeeded"}}),
]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.25
        return self.t


def _follow(tty: bool, events=EVENTS) -> str:
    out = io.StringIO()
    progress = Progress(out)
    progress.bars = StageBars(out, tty=tty, columns=100, clock=_Clock())
    for kind, e in events:
        progress.on_event(kind, e)
    progress.close()
    return out.getvalue()


def test_on_a_terminal_one_finished_bar_per_stage_and_notes_between():
    lines = screen(_follow(tty=True))
    assert lines[0] == "status: running on w (attempt 1)"
    assert lines[1].startswith("  resolve |" + "█" * 30 + "| done in ")
    assert lines[2].startswith("     load |" + "█" * 30 + "| done in ")
    assert lines[3] == "  warning: lm_head kept in float16"
    assert lines[4].startswith(" quantize |" + "█" * 30 + "| 2/2 100% done in ")
    assert lines[5].startswith("   export |" + "█" * 30 + "| done in ")
    assert lines[6] == "status: succeeded" and len(lines) == 7


def test_a_failed_job_leaves_its_bar_where_it_stopped():
    events = EVENTS[:5] + [("status", {"message": "failed: out of memory", "data": {"status": "failed"}})]
    lines = screen(_follow(tty=True, events=events))
    assert lines[-2].startswith(" quantize |" + "█" * 15 + " " * 15 + "| 1/2  50% stopped after ")
    assert lines[-1] == "status: failed: out of memory"


def test_on_a_pipe_plain_lines():
    lines = _follow(tty=False).splitlines()
    assert "\r" not in "".join(lines) and "\x1b" not in "".join(lines)
    assert lines[1] == "[resolve] started: /models/stories260K"
    assert "[quantize] 1/2  50% block 1/2 max rel err 0.1200" in lines
    assert "[quantize] 2/2 100% block 2/2" in lines
    assert lines[-2].startswith("[export] done in ") and lines[-1] == "status: succeeded"
