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


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _standby_attempt(tmp_path, n: int, spec: dict, token: str | None = None):
    """Attempt n of the real engine with a standby (its pre-job output in tmp_path/standby.log)."""
    work = tmp_path / f"work{n}"
    work.mkdir()
    return start_child(spec, cwd=work, log_path=tmp_path / f"child{n}.log",
                       env_extra={"QAAS_CHILD_HF_TOKEN": token} if token else {},
                       standby_log=tmp_path / "standby.log")


def test_the_next_attempt_runs_in_the_standby_engine_started_by_the_previous_one(tmp_path, monkeypatch):
    """The real engine: a standby is started beside each attempt, imports ahead, and the next attempt's job
    runs in it, with that attempt's log file and Hub token; a standby started with another environment is
    killed, not used."""
    from qaas.worker import child as child_module

    monkeypatch.setattr(child_module, "_standby", None)
    standby_log = tmp_path / "standby.log"

    def attempt(n: int, spec: dict, token: str | None = None):
        return _standby_attempt(tmp_path, n, spec, token)

    try:
        first = attempt(1, {"not": "a spec"})  # cold: no standby yet
        assert _events(first, timeout=120)[-2]["type"] == "error"
        standby = child_module._standby
        assert standby is not None and standby.proc.pid != first.pid

        # a local path the engine refuses, naming it in the error: the token in it comes back masked only if
        # the token reached the engine
        token = "hf_standbytoken0123456789"
        second = attempt(2, {"source": {"path": str(tmp_path / token)}, "options": {"allowed_roots": [str(tmp_path)]},
                             "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}, "out_dir": "out"},
                         token=token)
        assert second.pid == standby.proc.pid
        events = _events(second, timeout=120)
        error = events[-2]
        assert error["type"] == "error", events
        assert token not in json.dumps(events) and "***" in error["message"], events
        # the engine opened the job's own log itself (the parent opens it only for a cold start)
        assert (tmp_path / "child2.log").exists()
        assert token not in standby_log.read_text() and "Traceback" not in standby_log.read_text()  # preloaded fine
        assert second.proc.wait(timeout=30) == 2  # an engine error, as a cold engine exits

        waiting = child_module._standby
        assert waiting is not None and waiting.proc.pid not in (first.pid, second.pid)
        monkeypatch.setenv("QAAS_TEST_OTHER_ENV", "1")  # QAAS_* is not passed on: not a difference
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a difference: the standby's environment is stale
        third = attempt(3, {"not": "a spec"})
        assert third.pid != waiting.proc.pid
        assert _wait_dead(waiting.proc.pid)
        assert _events(third, timeout=120)[-2]["type"] == "error"
    finally:
        child_module.stop_standby()


def test_a_standby_started_by_another_thread_is_not_handed_a_job(tmp_path, monkeypatch):
    """PR_SET_PDEATHSIG ties a child to the thread that forked it: a standby started by an attempt on another
    thread (which may have ended, taking the standby with it) is killed and the attempt starts cold."""
    import threading

    from qaas.worker import child as child_module

    monkeypatch.setattr(child_module, "_standby", None)
    started: list = []

    def attempt(n: int) -> None:
        started.append(_standby_attempt(tmp_path, n, {"not": "a spec"}))

    try:
        other = threading.Thread(target=attempt, args=(1,))
        other.start()
        other.join()
        waiting = child_module._standby
        assert waiting is not None
        attempt(2)  # this thread: not the standby's
        assert started[1].pid != waiting.proc.pid
        assert _wait_dead(waiting.proc.pid)
        assert _events(started[1], timeout=120)[-2]["type"] == "error"  # it ran, cold
        assert child_module._standby is not None and child_module._standby.thread is threading.current_thread()
    finally:
        child_module.stop_standby()
