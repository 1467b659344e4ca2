#!/usr/bin/env bash
# Build the development environment quietly: one line per step; pip's full output (setuptools'
# banners, this machine's index-location notices) goes to a log, printed only when a step fails.
# Usage: scripts/setup_venv.sh PYTHON VENV
set -euo pipefail
py=$1
venv=$2
log="$venv/setup.log"
step() {
  local what=$1
  shift
  printf '  %-44s' "$what"
  local started=$SECONDS
  if "$@" >>"$log" 2>&1; then
    echo "ok ($((SECONDS - started)) s)"
  else
    echo "FAILED"
    echo "--- last 40 lines of $log ---"
    tail -n 40 "$log"
    exit 1
  fi
}
"$py" -m venv "$venv"
: >"$log"
echo "setting up $venv (full log: $log)"
step "pip" "$venv/bin/pip" install --upgrade pip
# torch first, pinned: pip then takes the CPU wheel found on these machines instead of the
# registry's CUDA build, and the later install finds it satisfied.
step "torch 2.13.0" "$venv/bin/pip" install "torch==2.13.0"
step "fedbpt and its extras (.[dev])" "$venv/bin/pip" install -e ".[dev]"
