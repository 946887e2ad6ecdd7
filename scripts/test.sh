#!/usr/bin/env bash
# Install everything (scripts/install.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${DTX_VENV:-.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"
