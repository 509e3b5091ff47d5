"""Every Triton kernel compiles for the H200 (sm_90), through the project's own launch code, on this CPU-only
machine (tests/support/gpu_compile.py): the interpreter the other kernel tests run cannot see a kernel that only
the compiler refuses (e.g. a plain Python global read inside a kernel, which once broke Q4_1 / Q5_1 with an
importance matrix on the GPU only) nor the GPU-only branches (inline PTX, persistent grids)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kernels_in_source() -> set[str]:
    """module.function of every top-level `*_kernel` in the kernels package's Triton modules."""
    found = set()
    for path in (ROOT / "kernels").glob("*triton*.py"):
        for name in re.findall(r"^def (\w+_kernel)\(", path.read_text(encoding="utf-8"), flags=re.M):
            found.add(f"{path.stem}.{name}")
    return found


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # cold: compile for real, not from a cache
    report = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, "-m", "tests.support.gpu_compile", "--json", str(report)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["errors"] == [], json.dumps(result["errors"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = {c["kernel"] for c in result["compiled"]}
    missing = _kernels_in_source() - compiled
    assert not missing, f"kernels never launched by tests/support/gpu_compile.py (add a launch): {sorted(missing)}"
