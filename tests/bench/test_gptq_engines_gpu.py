"""bench/gptq_engines_gpu.py's CPU path (--smoke): the real engine writes the checkpoint, GPTQModel loads it
(its torch kernel here; Marlin and ExLlama v2 on the GPU), logits against the script's own dequantization,
decode speed against the fp16 model, all in the report the GPU run commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.consumers import require

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_smoke_run_reports_logits_and_decode_speed_per_kernel(tmp_path):
    require("gptqmodel")
    out = tmp_path / "report.json"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-P", str(BENCH / "gptq_engines_gpu.py"), "--smoke", "--out", str(out),
                        "--workdir", str(tmp_path / "work")], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quantized_modules"] == 2 * 7 and report["engines"]["marlin"] and report["engines"]["exllamav2"]
    run = report["runs"]["torch"]
    assert run["kernel"] == ["TorchLinear"], run
    assert run["logits"]["relative"] < 0.02 and run["logits"]["argmax_agreement"] >= 0.9, run["logits"]
    for name in ("fp16", "torch"):
        decode = report["runs"][name]["decode"]
        assert [d["batch"] for d in decode] == [1, 2] and all(d["tokens_per_s"] > 0 for d in decode), decode
