#!/usr/bin/env bash
# The package as it declares itself: a fresh venv, torch==2.13.0 first (on these machines a local CPU
# wheel; a looser pin downloads GBs), then `pip install .` from pyproject.toml alone -- no
# constraints.txt -- and tests/install/smoke.py against it: migrate, the API and a worker on PostgreSQL
# and Redis, one job to `succeeded`. Catches ranges that resolve to a broken set (SQLAlchemy 2.1
# without greenlet) and files the wheel leaves out.
#
#   scripts/install-smoke.sh            the newest versions the declared ranges allow
#   scripts/install-smoke.sh --lowest   the lowest ones (each direct dependency at its lower bound)
set -euo pipefail
cd "$(dirname "$0")/.."
STEP_PREFIX=install-smoke
. scripts/lib.sh
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

WORK=$(mktemp -d -t qaas-install-smoke.XXXXXX)
trap 'rm -rf "$WORK" "$STEP_LOGS"' EXIT
# Build from a copy of the checkout (tracked and new files), so that the build leaves nothing in it.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK" --one-top-level=src
VPY="$WORK/venv/bin/python"
step "creating a venv" "$PYTHON" -m venv "$WORK/venv"
step "upgrading pip" "$VPY" -m pip install --disable-pip-version-check --upgrade pip
step "installing torch 2.13.0" "$VPY" -m pip install --disable-pip-version-check "torch==2.13.0"
if [ "${1:-}" = "--lowest" ]; then
  # uv resolves each direct dependency to the lowest version its range allows; torch stays the installed
  # CPU build (uv reads no pip.conf: the local wheel's folder is named here, its metadata has no CUDA deps)
  step "installing uv" "$VPY" -m pip install --disable-pip-version-check uv
  TORCH=$("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))')
  step "resolving the lowest versions" "$WORK/venv/bin/uv" pip compile --quiet --resolution lowest-direct \
    --python "$VPY" --no-header -o "$WORK/lowest.txt" "$WORK/src/pyproject.toml" \
    ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} --constraint <(echo "torch==$TORCH")
  say "lowest versions: $(grep -E '^[a-z]' "$WORK/lowest.txt" | tr '\n' ' ')"
  step "installing the lowest versions" "$VPY" -m pip install --disable-pip-version-check -r "$WORK/lowest.txt"
fi
say "installing qaas from pyproject.toml alone into a fresh venv"
step "installing qaas" "$VPY" -m pip install --disable-pip-version-check "$WORK/src"
cd "$WORK"  # nothing of the checkout on sys.path: the installed package alone
"$VPY" -P "$OLDPWD/tests/install/smoke.py"
