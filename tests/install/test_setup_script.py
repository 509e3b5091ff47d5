"""scripts/setup.sh: quiet when its steps succeed, the failing step's whole output when one fails,
nothing at all when the inputs have not changed since the last install.

The venv's interpreter is a stand-in that answers like pip (fifty warning lines per call) and fails on
request, so the script's own logic runs for real in a second, without installing anything.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
for i in $(seq 50); do echo "WARNING: pip chatter line $i" >&2; done
if [ -n "${FAKE_FAIL_ON:-}" ] && [[ "$*" == *"$FAKE_FAIL_ON"* ]]; then
  echo "ERROR: the stand-in pip failed on purpose" >&2
  exit 1
fi
case "$*" in *"print(sys.version)"*) echo "3.11.0 (stand-in)" ;; esac
exit 0
"""


def _pinned(name: str) -> str:
    line = next(line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith(f"{name}=="))
    return line.split("==", 1)[1]


@pytest.fixture
def fake_env(tmp_path) -> dict[str, str]:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    # a source distribution of llama-cpp-python holding just the converter files setup.sh unpacks
    version = _pinned("llama-cpp-python")
    sdist_dir = tmp_path / "cache" / "sdist"
    sdist_dir.mkdir(parents=True)
    with tarfile.open(sdist_dir / f"llama_cpp_python-{version}.tar.gz", "w:gz") as tar:
        for name in ("LICENSE.md", "vendor/llama.cpp/LICENSE", "vendor/llama.cpp/convert_hf_to_gguf.py",
                     "vendor/llama.cpp/conversion/__init__.py", "vendor/llama.cpp/gguf-py/gguf/__init__.py",
                     "vendor/llama.cpp/src/llama.cpp"):
            info = tarfile.TarInfo(f"llama_cpp_python-{version}/{name}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"\n"))
    return {**os.environ, "QAAS_VENV": str(tmp_path / "venv"), "QAAS_CACHE_DIR": str(tmp_path / "cache"),
            "FAKE_CALLS": str(tmp_path / "calls.txt")}


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_is_quiet_when_it_works_and_silent_when_nothing_changed(fake_env, tmp_path):
    r = _setup(fake_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("setup: ") for line in lines), r.stderr  # a line per step, no pip output
    assert "chatter" not in r.stderr
    calls = (tmp_path / "calls.txt").read_text()
    assert "wheel --no-deps" in calls and "install -c constraints.txt" in calls and "gptqmodel==" in calls
    src = tmp_path / "cache" / f"llama-cpp-python-{_pinned('llama-cpp-python')}-src" / "vendor" / "llama.cpp"
    assert (src / "convert_hf_to_gguf.py").is_file() and (src / "gguf-py" / "gguf").is_dir()
    assert not (src / "src").exists()  # only the converter's files are unpacked, not the C++ sources

    (tmp_path / "calls.txt").unlink()
    # pretend the build produced its wheel: nothing is missing now, so the second run installs nothing
    (wheels,) = (tmp_path / "cache").glob("llama-cpp-python-*-[0-9a-f]*[0-9a-f]")
    (wheels / "llama_cpp_python-0-py3-none-any.whl").write_bytes(b"")
    again = _setup(fake_env)
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""
    assert "pip" not in (tmp_path / "calls.txt").read_text()  # only the interpreter's version, for the stamp


def test_a_failing_step_shows_its_whole_output_and_leaves_no_stamp(fake_env, tmp_path):
    r = _setup({**fake_env, "FAKE_FAIL_ON": "install -c constraints.txt"})
    assert r.returncode != 0
    assert "setup: installing qaas failed; its output:" in r.stderr
    assert "ERROR: the stand-in pip failed on purpose" in r.stderr
    assert r.stderr.count("pip chatter line") == 50  # that step's output, whole; not the earlier steps'
    assert not (tmp_path / "venv" / ".qaas-setup-stamp").exists()
