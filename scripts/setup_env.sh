#!/usr/bin/env bash
# Creates .venv at the repository root (if missing) and builds solo_fast into it.
# Installs torch==2.13.0 (the CPU build) only when no torch is importable in the venv,
# so a CUDA torch that a user installed there first is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q torch==2.13.0
fi
# Build dependencies first: the extension is built against the torch installed above.
"$VPY" -m pip install -q ninja numpy
"$VPY" -m pip install -q --no-build-isolation -e ".[test]"
"$VPY" -c "import solo_fast, solo_fast._ext as e; e.load(); print('solo_fast', solo_fast.__version__, 'ready; compiled ops:', e.available())"
