"""llama.cpp's own converter, from the llama-cpp-python source distribution, as a test oracle.

`scripts/setup.sh` unpacks `vendor/llama.cpp/convert_hf_to_gguf.py`, its `conversion/` package and
`gguf-py` from the very source distribution the installed llama-cpp-python was built from, into
`$QAAS_CACHE_DIR/llama-cpp-python-<version>-src` (never into the repository). `QAAS_LLAMA_CPP_SOURCE`
may point at another unpacked `vendor/llama.cpp` folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from support.consumers import missing


def cache_dir() -> Path:
    """Where scripts/setup.sh keeps built wheels and unpacked sources (the same default)."""
    if os.environ.get("QAAS_CACHE_DIR"):
        return Path(os.environ["QAAS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qaas"


def llama_cpp_dir() -> Path:
    """The unpacked `vendor/llama.cpp` folder matching the installed llama-cpp-python (fails in CI if absent)."""
    if os.environ.get("QAAS_LLAMA_CPP_SOURCE"):
        folder = Path(os.environ["QAAS_LLAMA_CPP_SOURCE"])
    else:
        try:
            version = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            missing("llama-cpp-python is not installed")
        folder = cache_dir() / f"llama-cpp-python-{version}-src" / "vendor" / "llama.cpp"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        missing(f"llama.cpp's converter is not unpacked at {folder}")
    return folder


#: Runs the converter with its BPE pre-tokenizer lookup answering $QAAS_ORACLE_BPE_PRE (see convert_hf_to_gguf).
_WITH_PRE_NAME = """
import os, runpy, sys
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ["QAAS_ORACLE_BPE_PRE"]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_hf_to_gguf(model_dir: Path, outfile: Path, outtype: str = "f16", *extra: str,
                       bpe_pre: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `convert_hf_to_gguf.py MODEL --outfile OUT --outtype TYPE` as llama.cpp documents it
    (`PYTHONPATH=gguf-py:.` from its folder), with this interpreter; raises with its output if it fails.

    `bpe_pre`: for a BPE vocabulary built in a test, the name the converter's pre-tokenizer lookup answers.
    The converter knows a pre-tokenizer only by the hash of a test text's token ids under a published
    vocabulary, so it refuses any other vocabulary; everything else it writes is its own."""
    folder = llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "gguf-py"), str(folder)])}
    script = [str(folder / "convert_hf_to_gguf.py")]
    if bpe_pre is not None:
        env["QAAS_ORACLE_BPE_PRE"] = bpe_pre
        script = ["-c", _WITH_PRE_NAME, *script]
    r = subprocess.run([sys.executable, *script, str(model_dir), "--outfile", str(outfile),
                        "--outtype", outtype, *extra], cwd=folder, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"convert_hf_to_gguf.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r
