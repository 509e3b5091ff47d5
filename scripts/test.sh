#!/usr/bin/env bash
# Set up, then run the test suite against the real PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1   # Triton kernels run in the interpreter on the CPU
exec .venv/bin/pytest "$@"
