# Shared by the scripts here: quiet steps whose output is shown only when they fail.
# Source it after `set -euo pipefail`; it makes $STEP_LOGS (removed on exit).

STEP_LOGS=$(mktemp -d -t qaas-steps.XXXXXX)
trap 'rm -rf "$STEP_LOGS"' EXIT

# step "what" command...: run quietly; on failure show what it printed and stop.
step() {
  local what=$1 log
  shift
  log="$STEP_LOGS/$(printf '%s' "$what" | tr -c 'A-Za-z0-9' '_').log"
  if ! "$@" >"$log" 2>&1; then
    echo "${STEP_PREFIX:-qaas}: $what failed; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
}

say() { echo "${STEP_PREFIX:-qaas}: $*" >&2; }
