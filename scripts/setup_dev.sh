#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian/Ubuntu machine: the system packages (Chromium for the
# documentation site's browser check and the web page's tests, which Playwright drives as it is: no browser
# download; fonts for the figures), a virtual environment .venv, and the package with its dev extra (torch CPU,
# transformers, the docs tools, Playwright). Run from anywhere; safe to run again.
#   bash scripts/setup_dev.sh && . .venv/bin/activate && python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(chromium fonts-dejavu-core)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); elif command -v sudo >/dev/null; then SUDO=(sudo); else
    echo "setup_dev.sh: needs the system packages ${missing[*]} (apt-get install them as root)" >&2; exit 1
  fi
  echo "installing system packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
# torch==2.13.0 (CPU) is pinned exactly in the dev extra, so pip never resolves another build.
pip install -q -e ".[dev]"
echo "ready: . .venv/bin/activate && python -m pytest"
