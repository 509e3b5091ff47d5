"""The compressed-tensors benchmarks run on the CPU at tiny shapes: fp8_gpu.py --smoke (the GPU run's every step:
random checkpoint, streamed conversion, Triton bytes against the torch reference, transformers +
compressed-tensors logits against our reference) and ct_quality.py on stories260K."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.consumers import require

BENCH = Path(__file__).resolve().parents[2] / "bench"
from conftest import STORIES  # where the assets are: QAAS_TEST_ASSETS or ../shared


def _run(*args: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels in the interpreter, on the CPU
    out = subprocess.run([sys.executable, "-P", *args], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def test_fp8_gpu_smoke_runs_every_step(tmp_path):
    require("compressed_tensors")
    _run(str(BENCH / "fp8_gpu.py"), "--smoke", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["convert"]["quantized_layers"] == 14 and r["convert"]["kept"] == ["lm_head"]
    assert r["convert"]["size_after_bytes"] < r["convert"]["size_before_bytes"]
    assert r["kernel_bytes"]["elements"] > 0 and r["kernel_bytes"]["differing_bytes"] == 0
    for path in ("decompressed", "fp8_kernels"):  # on the CPU both are compressed-tensors' decompression
        assert r["transformers"][path]["max_abs_diff"] == 0.0, r["transformers"]


def test_ct_quality_writes_its_table(tmp_path):
    require("compressed_tensors")
    out = tmp_path / "q.md"
    _run(str(BENCH / "ct_quality.py"), "--model", str(STORIES), "--rows", "fp16,fp8-dynamic,w4a16", "--windows", "1",
         "--seqlen", "128", "--group-size", "32", "--out", str(out), "--workdir", str(tmp_path / "w"))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["fp16", "fp8-dynamic", "w4a16"]
    fp16, fp8, w4 = (r["ppl"] for r in rows)
    assert abs(fp8 / fp16 - 1) < 0.05 and w4 > fp8  # FP8 near the original, 4-bit further away
    assert "| W4A16 RTN |" in out.read_text()
