#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test (Playwright drives it; no browser download,
# the machines have no internet). Installs it when missing and we are root; otherwise says how.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "chromium is missing: sudo apt-get install chromium (the dashboard's browser test needs it)" >&2
fi
