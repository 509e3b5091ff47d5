"""The GPU child process of one job attempt, seen from its parent.

The parent (the Celery worker) never imports torch or touches CUDA: it starts
`python -P -m qaas.worker.engine.runner`, writes the job spec to its stdin, and reads one JSON
event per line from its stdout. Killing the child (cancel, time limit, lost lease) frees the GPU.
The child dies with its parent (PR_SET_PDEATHSIG), so a killed worker leaves no orphan on the GPU.
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
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.proc.wait()


ENGINE_MODULE = "qaas.worker.engine.runner"


def start_child(spec: dict[str, Any], *, cwd: Path, log_path: Path, env_extra: dict[str, str],
                module: str = ENGINE_MODULE) -> ChildProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    env.update(env_extra)
    env["PYTHONUNBUFFERED"] = "1"
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log_file,
        cwd=cwd,
        env=env,
        start_new_session=True,  # its own process group: SIGKILL reaches the whole tree
        preexec_fn=die_with_parent(signal.SIGKILL),
    )
    log_file.close()
    child = ChildProcess(proc)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()

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
