"""The child-process protocol: JSON lines on stdout, exit codes, SIGTERM cancel, token never leaked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TOKEN = "hf_TESTSECRET_do_not_leak_123"


def _spawn(spec: dict, tmp_path: Path, token: str | None = TOKEN) -> subprocess.Popen:
    env = dict(os.environ)
    if token:
        env["QAAS_CHILD_HF_TOKEN"] = token
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "qaas.worker.engine.runner"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env, text=True,
    )
    proc._spec_text = json.dumps(spec)
    return proc


def _communicate(proc: subprocess.Popen, timeout: int) -> tuple[str, str]:
    return proc.communicate(input=proc._spec_text, timeout=timeout)


def _spec(src: Path, out: Path, **opts) -> dict:
    return {
        "source": {"path": str(src)},
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "out_dir": str(out),
        "options": {"allowed_roots": [str(src.parent)], "evaluate": False, **opts},
    }


@pytest.mark.slow
def test_protocol_success(stories_dir, wikitext_path, tmp_path):
    proc = _spawn(_spec(stories_dir, tmp_path / "out", evaluate=True, eval_text_path=str(wikitext_path),
                        eval_max_windows=2), tmp_path)
    stdout, stderr = _communicate(proc, 300)
    assert proc.returncode == 0, stderr[-3000:]
    events = [json.loads(line) for line in stdout.splitlines()]  # every stdout line is JSON
    assert {e["type"] for e in events} <= {"stage", "progress", "log", "result"}
    stages = [e["stage"] for e in events if e["type"] == "stage"]
    assert stages == ["resolve", "load", "quantize", "evaluate", "export"]
    prog = [e for e in events if e["type"] == "progress"]
    assert all({"done", "total", "message", "metrics"} <= set(e) for e in prog)
    assert events[-1]["type"] == "result"
    result = events[-1]["result"]
    assert result["evaluation"]["windows"] == 2
    assert (tmp_path / "out" / "config.json").is_file()
    assert TOKEN not in stdout and TOKEN not in stderr


@pytest.mark.slow
def test_protocol_engine_error(stories_dir, tmp_path):
    spec = _spec(stories_dir, tmp_path / "out")
    spec["quantization_config"]["bnb_4bit_quant_storage"] = "float16"
    proc = _spawn(spec, tmp_path)
    stdout, stderr = _communicate(proc, 120)
    assert proc.returncode == 2, stderr[-2000:]
    (event,) = [json.loads(line) for line in stdout.splitlines()]
    assert event["type"] == "error" and event["code"] == "invalid_config"
    assert event["field"] == "bnb_4bit_quant_storage" and "uint8" in event["message"]
    assert "stage" in event


@pytest.mark.slow
def test_protocol_source_rejected_and_bad_spec(tmp_path):
    proc = _spawn({"source": {"path": "/etc"}, "quantization_config": {"quant_method": "bitsandbytes",
                   "load_in_8bit": True}, "out_dir": str(tmp_path / "o"),
                   "options": {"allowed_roots": [str(tmp_path)], "evaluate": False}}, tmp_path)
    stdout, _ = _communicate(proc, 120)
    assert proc.returncode == 2
    last = json.loads(stdout.splitlines()[-1])
    assert last["code"] == "source_rejected" and last["stage"] == "resolve"

    proc = _spawn({"nonsense": True}, tmp_path)
    stdout, _ = _communicate(proc, 120)
    assert proc.returncode == 2 and json.loads(stdout.splitlines()[-1])["code"] == "invalid_config"

    spec = {"source": {"path": "x"}, "quantization_config": {}, "out_dir": "y", "options": {"hub_token": TOKEN}}
    proc = _spawn(spec, tmp_path)
    stdout, stderr = _communicate(proc, 120)
    assert proc.returncode == 2 and TOKEN not in stdout and TOKEN not in stderr


@pytest.mark.slow
def test_sigterm_cancels_with_exit_3(stories_dir, wikitext_path, tmp_path):
    proc = _spawn(_spec(stories_dir, tmp_path / "out", evaluate=True, eval_text_path=str(wikitext_path),
                        eval_max_windows=64), tmp_path)
    proc.stdin.write(proc._spec_text)
    proc.stdin.close()
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1].get("stage") == "evaluate":  # mid-run: weights written, 2 x 64 windows to go
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=120)
    events += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 3, proc.stderr.read()[-2000:]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    assert events[-1]["stage"] == "evaluate"
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
