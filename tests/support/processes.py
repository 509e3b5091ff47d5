"""Start the service's real processes (API, worker, `qaas up`) for tests, and stop them cleanly.

Each process is started through the `qaas` console entry with its own environment, its output
goes to a log file under the test's directory (kept as a test artefact), and its PID is recorded
so chaos tests can kill it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

QAAS = [sys.executable, "-P", "-c", "from qaas.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


@dataclass
class Stack:
    """Processes started by one test; stopped (and their logs kept) at teardown."""

    workdir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        env = {**os.environ, **self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        log_path = self.workdir / f"{name}.log"
        out = open(log_path, "ab")
        popen = subprocess.Popen([*QAAS, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                 cwd=cwd or self.workdir, start_new_session=True)
        out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_api(self, port: int | None = None) -> tuple[Proc, str]:
        port = port or free_port()
        proc = self.start("api", "api", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        return proc, url

    def start_worker(self, name: str = "worker") -> Proc:
        proc = self.start(name, "worker")
        wait_for_log(proc, "ready", timeout=60)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def save_logs(self, directory: Path, prefix: str) -> None:
        """Keep every process's log as a test artefact (`<prefix>-<name>.log`)."""
        directory.mkdir(parents=True, exist_ok=True)
        for proc in self.procs:
            (directory / f"{prefix}-{proc.name}.log").write_text(proc.log())


def wait_http(url: str, proc: Proc | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def wait_for_log(proc: Proc, needle: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.log():
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} did not log {needle!r} in {timeout}s:\n{proc.log()[-3000:]}")


def wait_job(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in statuses:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} did not reach {statuses} in {timeout}s; last: {job}")
