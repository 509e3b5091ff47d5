"""Small helpers shared by the chaos tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

FINAL = {"succeeded", "failed", "cancelled"}
NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "float32"}


def events(c: httpx.Client, jid: str) -> list[dict]:
    r = c.get(f"/v1/jobs/{jid}/events")
    r.raise_for_status()
    return r.json()["items"]


def wait_event(c: httpx.Client, jid: str, pred, timeout: float = 120.0, what: str = "event") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in events(c, jid):
            if pred(e):
                return e
        time.sleep(0.1)
    raise TimeoutError(f"job {jid}: no {what} in {timeout}s; events: {events(c, jid)[-10:]}")


def engine_started(c: httpx.Client, jid: str, attempt: int, timeout: float = 120.0) -> int:
    """The engine child's PID, from the job's 'engine started' event of that attempt."""
    e = wait_event(c, jid, lambda e: e["message"] == "engine started" and (e["data"] or {}).get("attempt") == attempt,
                   timeout, f"'engine started' of attempt {attempt}")
    return int(e["data"]["pid"])


def wait_progress(c: httpx.Client, jid: str, stage: str, done: int, timeout: float = 120.0) -> None:
    wait_event(c, jid, lambda e: e["kind"] == "progress" and e["stage"] == stage and (e["data"] or {}).get("done", 0) >= done,
               timeout, f"{stage} progress {done}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_dead(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} is still alive after {timeout}s")
        time.sleep(0.05)


def fake_env(step_s: float = 0.0) -> dict[str, str]:
    """Worker environment for the test-only fake engine (QAAS_ENV=test is set by settings_env)."""
    return {"QAAS_FAKE_ENGINE": "1", "QAAS_FAKE_ENGINE_STEP_S": str(step_s)}
