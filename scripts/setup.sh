#!/usr/bin/env bash
# Create .venv and install qaas with its pinned, tested dependencies, the consumer libraries the tests
# load every output format with, and llama.cpp's own converter as a test oracle.
#
# Quiet: each step's output goes to a log that is shown only when the step fails. Quick when nothing
# changed: a stamp of the inputs (pyproject.toml, setup.py, constraints.txt, this script) skips the
# installs. The first run on a machine builds llama-cpp-python from source (a C++ build, about 5 minutes
# on 2 cores); the wheel is kept under $QAAS_CACHE_DIR and reused by later runs and other checkouts.
#
#   QAAS_VENV       the virtual environment (default .venv)
#   QAAS_CACHE_DIR  built wheels and unpacked sources (default ${XDG_CACHE_HOME:-~/.cache}/qaas)
#   PYTHON          the interpreter the venv is made from (default python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QAAS_VENV:-.venv}
CACHE=${QAAS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qaas}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
PY="$VENV/bin/python"

# One pin for each package, in constraints.txt.
pinned() { sed -n "s/^$1==//p" constraints.txt; }
LLAMA_CPP_VERSION=$(pinned llama-cpp-python)
GPTQMODEL_VERSION=$(pinned gptqmodel)
# llama.cpp built with only what llama_cpp.Llama, llama_model_quantize and libggml-base's
# ggml_quantize_chunk need: no multimodal library (mtmd), no OpenMP; GGML_NATIVE=OFF builds the portable
# AVX2 variant, so the cached wheel runs on any x86-64 host of that level rather than only this CPU.
LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF"

STEP_PREFIX=setup
. scripts/lib.sh

stamp_of_inputs() {
  cat pyproject.toml setup.py constraints.txt scripts/setup.sh scripts/lib.sh | sha256sum | cut -c1-16
  "$PY" -c 'import sys; print(sys.version)' 2>/dev/null
}

if [ ! -x "$PY" ]; then
  say "creating $VENV"
  step "creating $VENV" "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.qaas-setup-stamp"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of_inputs)" ] \
   && [ -d "$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-src" ]; then
  exit 0  # installed from these very inputs
fi

PIP=("$PY" -m pip --disable-pip-version-check)
step "upgrading pip" "${PIP[@]}" install --upgrade pip
# torch first, pinned: on these machines torch==2.13.0 is a local CPU wheel; a looser pin downloads GBs.
if ! "$PY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
  say "installing torch 2.13.0"
  step "installing torch" "${PIP[@]}" install "torch==2.13.0"
fi

# llama-cpp-python from its source distribution, built once per version and build flags.
LLAMA_WHEELS="$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
LLAMA_SDIST_DIR="$CACHE/sdist"
llama_sdist() { ls "$LLAMA_SDIST_DIR"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz 2>/dev/null; }
if [ -z "$(ls "$LLAMA_WHEELS"/*.whl 2>/dev/null)" ] || [ ! -d "$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-src" ]; then
  mkdir -p "$LLAMA_SDIST_DIR"
  [ -n "$(llama_sdist)" ] || step "downloading the llama-cpp-python source" \
    "${PIP[@]}" download --no-deps --no-binary llama-cpp-python -d "$LLAMA_SDIST_DIR" "llama-cpp-python==$LLAMA_CPP_VERSION"
fi
if [ -z "$(ls "$LLAMA_WHEELS"/*.whl 2>/dev/null)" ]; then
  say "building llama-cpp-python $LLAMA_CPP_VERSION from source (once per machine: about 5 minutes on 2 cores)"
  rm -rf "$LLAMA_WHEELS.partial" && mkdir -p "$LLAMA_WHEELS.partial"
  step "building llama-cpp-python" env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" wheel --no-deps -w "$LLAMA_WHEELS.partial" "$(llama_sdist)"
  mv "$LLAMA_WHEELS.partial" "$LLAMA_WHEELS"
fi
# The same source distribution's converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py):
# the GGUF tests run it as an oracle (tests/support/llama_cpp_source.py); never copied into the project.
SRC="$CACHE/llama-cpp-python-$LLAMA_CPP_VERSION-src"
if [ ! -d "$SRC" ]; then
  rm -rf "$SRC.partial" && mkdir -p "$SRC.partial"
  step "unpacking llama.cpp's converter" tar -xzf "$(llama_sdist)" -C "$SRC.partial" --strip-components=1 \
    --wildcards "*/LICENSE.md" "*/vendor/llama.cpp/LICENSE" "*/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*"
  mv "$SRC.partial" "$SRC"
fi

say "installing qaas and its dependencies into $VENV"
step "installing qaas" "${PIP[@]}" install -c constraints.txt --find-links "$LLAMA_WHEELS" -e ".[test]"
# GPTQModel declares a newer torch and transformers than the CPU build here; without CUDA extensions it
# runs on its pure-torch backend (GPTQ_TORCH). Its runtime dependencies are the `consumers` extra.
step "installing GPTQModel" env BUILD_CUDA_EXT=0 \
  "${PIP[@]}" install --no-deps --no-build-isolation -c constraints.txt "gptqmodel==$GPTQMODEL_VERSION"
stamp_of_inputs >"$STAMP"
