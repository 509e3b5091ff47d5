"""The GPU child process of one job attempt, seen from its parent.

The parent (the Celery worker) never imports torch or touches CUDA: it starts
`python -P -m qaas.worker.engine.runner`, writes the job spec to its stdin, and reads one JSON
event per line from its stdout. Killing the child (cancel, time limit, lost lease) frees the GPU.
The child dies with its parent (PR_SET_PDEATHSIG), so a killed worker leaves no orphan on the GPU.

A standby engine (`standby_log` given): each attempt also starts the process of the next one, which imports
torch, transformers' model machinery and the engine (seconds: measured 4-8 s of a job's fixed cost on the GPU
machine) and then waits, without touching CUDA, for its job on stdin. The next attempt hands it the job with a
first line saying where to run (cwd, log file, the Hub token), so a job still gets a fresh process of its own
(killing it frees the GPU as before) but not a fresh interpreter's imports. A standby is only used when the
environment it was started with is the one the new attempt would get; otherwise it is killed and the attempt
starts cold.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaas.kit.parent_death import die_with_parent
# the variables the engine reads its Hub token from and that make it a standby (the runner imports no torch)
from qaas.worker.engine.runner import STANDBY_ENV, TOKEN_ENV

@dataclass
class ChildProcess:
    proc: subprocess.Popen
    events: "queue.Queue[dict[str, Any] | None]" = field(default_factory=queue.Queue)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        """Ask the engine to stop at its next check (cooperative cancel)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def peak_rss_bytes(self) -> int:
        """The engine's resident-memory high-water mark (VmHWM), 0 once it is gone or off Linux."""
        try:
            with open(f"/proc/{self.proc.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def kill(self) -> None:
        _kill_group(self.proc)


ENGINE_MODULE = "qaas.worker.engine.runner"


@dataclass
class _Standby:
    proc: subprocess.Popen
    env: dict[str, str]  # what it was started with (its standby flag aside)
    #: the thread that started it: PR_SET_PDEATHSIG kills a child when the *thread* that forked it ends, so a
    #: standby is only handed a job by that same thread (a worker's attempts all run on its main thread)
    thread: threading.Thread


#: this worker process's standby engine (one: a worker runs one job at a time)
_standby: _Standby | None = None


def _child_env(env_extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update(env_extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(module: str, *, cwd: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log_file = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-P", "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own process group: SIGKILL reaches the whole tree
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
    finally:
        log_file.close()


def _take_standby(env: dict[str, str]) -> subprocess.Popen | None:
    """The waiting standby engine if this thread started it with `env` and it is alive; any other is killed."""
    global _standby
    standby, _standby = _standby, None
    if standby is None:
        return None
    if standby.thread is threading.current_thread() and standby.proc.poll() is None and standby.env == env:
        return standby.proc
    _kill_group(standby.proc)
    return None


def _start_standby(env: dict[str, str], log_path: Path) -> None:
    global _standby
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc = _spawn(ENGINE_MODULE, cwd=log_path.parent, log_path=log_path, env={**env, STANDBY_ENV: "1"})
    _standby = _Standby(proc, env, threading.current_thread())


def stop_standby() -> None:
    """Kill the waiting standby engine, if any (a worker shutting down; tests)."""
    global _standby
    standby, _standby = _standby, None
    if standby is not None:
        _kill_group(standby.proc)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.kill()
    proc.wait()


def start_child(spec: dict[str, Any], *, cwd: Path, log_path: Path, env_extra: dict[str, str],
                module: str = ENGINE_MODULE, standby_log: Path | None = None) -> ChildProcess:
    """The engine process of one attempt, running `spec`. With `standby_log` (the engine module only), the job
    goes to the standby engine started by the previous attempt when it matches, and a standby for the next
    attempt is started (its output before it gets a job goes to `standby_log`)."""
    token = env_extra.get(TOKEN_ENV)
    env = _child_env({k: v for k, v in env_extra.items() if k != TOKEN_ENV})
    use_standby = standby_log is not None and module == ENGINE_MODULE
    proc = _take_standby(env) if use_standby else None
    if proc is not None:
        assert proc.stdin is not None
        # where and as what to run, then the spec as a cold engine reads it (the token in the pipe, not argv)
        where = {"cwd": str(cwd), "log_path": str(log_path), "env": {TOKEN_ENV: token} if token else {}}
        try:
            proc.stdin.write(json.dumps(where).encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # it died since it was checked: the attempt starts cold instead of failing
            _kill_group(proc)
            proc = None
    if proc is None:
        proc = _spawn(module, cwd=cwd, log_path=log_path, env={**env, **({TOKEN_ENV: token} if token else {})})
    child = ChildProcess(proc)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    if use_standby:
        _start_standby(env, standby_log)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"type": "log", "level": "warning", "message": line.decode(errors="replace")[:500]}
            child.events.put(event)
        child.events.put(None)  # end of stream

    threading.Thread(target=read, name=f"child-{proc.pid}-reader", daemon=True).start()
    return child
