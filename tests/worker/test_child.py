"""The engine child seen from its parent (`qaas.worker.child`): a real `python -P -m` process per test.

The child here is a small script written by the test and put on the child's PYTHONPATH, so each test
decides exactly what the child prints and how it behaves under signals.
"""

from __future__ import annotations

import json
import os
import queue
import textwrap
import time

import pytest

from qaas.worker.child import start_child

pytestmark = pytest.mark.timeout(60)


def _child(tmp_path, name: str, body: str, *, spec: dict | None = None, env: dict | None = None):
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / f"{name}.py").write_text(textwrap.dedent(body))
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return start_child(spec or {"hello": "child"}, cwd=work, log_path=tmp_path / "child.log",
                       env_extra={"PYTHONPATH": str(lib), **(env or {})}, module=name)


def _events(child, timeout: float = 30.0) -> list:
    out, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            event = child.events.get(timeout=0.5)
        except queue.Empty:
            continue
        out.append(event)
        if event is None:
            return out
    raise AssertionError(f"the child's stream did not end: {out}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_spec_goes_in_on_stdin_and_json_lines_come_out_as_events(tmp_path, monkeypatch):
    monkeypatch.setenv("QAAS_SECRET_KEY", "the-service-secret")
    child = _child(tmp_path, "talker", """
        import json, os, sys
        spec = json.loads(sys.stdin.read())
        print(json.dumps({"type": "stage", "stage": "load", "spec": spec}))
        print("a plain line, not JSON")
        print()
        print(json.dumps({"type": "log", "env": {k: v for k, v in os.environ.items() if k.startswith(("QAAS_", "EXTRA"))}}))
        sys.stderr.write("to the log file\\n")
    """, spec={"source": {"path": "/m"}}, env={"EXTRA_VAR": "given"})
    events = _events(child)
    assert child.proc.wait(10) == 0
    assert events[0] == {"type": "stage", "stage": "load", "spec": {"source": {"path": "/m"}}}
    assert events[1] == {"type": "log", "level": "warning", "message": "a plain line, not JSON"}
    # the service's own settings (the secret key among them) never reach the engine; what the parent adds does
    assert events[2] == {"type": "log", "env": {"EXTRA_VAR": "given"}}
    assert events[3] is None and len(events) == 4  # the empty line is skipped; None ends the stream
    assert "to the log file" in (tmp_path / "child.log").read_text()


def test_terminate_asks_politely_and_kill_takes_the_whole_process_group(tmp_path):
    child = _child(tmp_path, "stubborn", """
        import json, signal, subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        def on_term(*_):
            print(json.dumps({"type": "log", "message": "SIGTERM received"}), flush=True)
        signal.signal(signal.SIGTERM, on_term)
        print(json.dumps({"type": "log", "grandchild": grandchild.pid}), flush=True)
        while True:
            time.sleep(0.05)
    """)
    first = child.events.get(timeout=30)
    grandchild = first["grandchild"]
    assert _alive(child.pid) and _alive(grandchild)
    assert child.peak_rss_bytes() > 1_000_000  # VmHWM of a live Python process
    child.terminate()
    assert child.events.get(timeout=10) == {"type": "log", "message": "SIGTERM received"}
    assert child.poll() is None  # a cooperative engine decides itself when to stop
    child.kill()
    assert child.poll() == -9
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the SIGKILL must reach the engine's own children (its process group)"
    assert child.peak_rss_bytes() == 0
    child.kill()  # idempotent on a dead child
