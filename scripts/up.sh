#!/usr/bin/env bash
# Set up (quietly; the first time takes several minutes), then run the whole service (API + worker) on
# embedded defaults: SQLite and a filesystem broker under ./qaas-data, the CPU if there is no GPU.
# The URL and the first API key are the last lines it prints; the service's log is qaas-data/qaas-up.log.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${QAAS_VENV:-.venv}/bin/qaas" up "$@"
