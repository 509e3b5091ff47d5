#!/usr/bin/env bash
# Set up, then run the whole service (API + worker) on embedded defaults:
# SQLite and a filesystem broker under ./qaas-data, the CPU if there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/qaas up "$@"
