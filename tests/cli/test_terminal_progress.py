"""What `qaas quantize` draws on a terminal: a real run on stories260K (GPTQ and NF4) with stderr on a pty,
the bytes replayed through a minimal terminal (carriage return, erase-to-end-of-line, newline) to get the
lines a user is left looking at."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
from conftest import SHAKESPEARE, STORIES, WIKITEXT

from support.terminal import screen

pytestmark = pytest.mark.slow

QAAS = [sys.executable, "-P", "-c", "from qaas.cli import main; main()"]
BAR = re.compile(r"^\s*(?P<stage>[a-z]+) \|(?P<bar>[█ ]+)\| (?P<rest>.*)$")


def run_on_a_pty(args: list[str], columns: int = 120) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal received on stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAAS_")}
    proc = subprocess.Popen([*QAAS, *args], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    received = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    out = proc.stdout.read().decode()
    return proc.wait(timeout=300), out, received.decode()


def check_bars(raw: str, stages: list[str]) -> list[str]:
    """One finished bar per stage, in order, each complete; every other line a note of its own."""
    assert re.sub(r"\x1b\[K", "", raw).count("\x1b") == 0, "escape sequences other than erase-line"
    lines = screen(raw)
    bars = [m for m in map(BAR.match, lines) if m]
    assert [b["stage"] for b in bars] == stages, lines
    for b in bars:
        assert "█" in b["bar"] and " " not in b["bar"], b.group(0)  # full
        assert re.search(r"done in (\d+\.\d|\d+m\d\d)s$", b["rest"]), b.group(0)
        count = re.match(r"(\d+)/(\d+) ", b["rest"])
        assert count is None or count[1] == count[2], b.group(0)
    for line in lines:
        if not BAR.match(line):
            assert re.match(r"^\[(resolve|load|calibrate|quantize|evaluate|export)\] (info|warning|error): ", line), line
        assert "0step" not in line and "?" not in line and "Loading weights" not in line, line
    return lines


def test_gptq_draws_one_clean_bar_per_stage_with_warnings_on_their_own_lines(tmp_path):
    texts = SHAKESPEARE.read_text().split("\n\n")[:64]
    config = tmp_path / "gptq.json"
    config.write_text(json.dumps({"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": texts,
                                  "model_seqlen": 16}))
    code, out, raw = run_on_a_pty(["quantize", str(STORIES), "--config", str(config), "--out", str(tmp_path / "out"),
                                   "--no-eval"])
    assert code == 0, raw[-3000:]
    assert json.loads(out)["method"] == "gptq"
    lines = check_bars(raw, ["resolve", "load", "calibrate", "quantize", "export"])
    bar = {m["stage"]: m["rest"] for m in map(BAR.match, lines) if m}
    assert bar["calibrate"].startswith("2/2 100%") and bar["quantize"].startswith("5/5 100%")
    # transformers' tokenizer warning (the calibration text is longer than the model's context) is a line of
    # its own, not spliced into the calibrate bar
    assert any(line.startswith("[calibrate] warning: Token indices sequence length is longer") for line in lines), lines


def test_nf4_with_evaluation_draws_one_clean_bar_per_stage(tmp_path):
    config = json.dumps({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                         "bnb_4bit_compute_dtype": "float32"})
    code, out, raw = run_on_a_pty(["quantize", str(STORIES), "--config", config, "--out", str(tmp_path / "out"),
                                   "--eval-text", str(WIKITEXT)])
    assert code == 0, raw[-3000:]
    assert json.loads(out)["evaluation"]["perplexity_after"] > 0
    lines = check_bars(raw, ["resolve", "load", "quantize", "evaluate", "export"])
    bar = {m["stage"]: m["rest"] for m in map(BAR.match, lines) if m}
    assert bar["quantize"].startswith("5/5 100%") and re.match(r"(\d+)/\1 100%", bar["evaluate"])


def test_a_failed_run_leaves_its_bar_stopped_and_the_error_below(tmp_path):
    bad = tmp_path / "pickle-model"
    bad.mkdir()
    (bad / "config.json").write_text((STORIES / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    config = json.dumps({"quant_method": "bitsandbytes", "load_in_8bit": True})
    code, _, raw = run_on_a_pty(["quantize", str(bad), "--config", config, "--out", str(tmp_path / "out")])
    assert code == 2
    lines = screen(raw)
    assert re.match(r"^\s*resolve \|\s+\| … stopped after (\d+\.\d|\d+m\d\d)s$", lines[-2]), lines
    assert lines[-1].startswith("error (source_rejected): "), lines
