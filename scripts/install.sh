#!/usr/bin/env bash
# Create a virtual environment (default .venv, or $DTX_VENV) and install every dtx package from this checkout.
# CPU torch is pinned here only (the wheel on these machines); the packages themselves ask for torch>=2.5.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DTX_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
C="-c .ci/constraints.txt"
$PIP install -q --upgrade pip setuptools wheel >/dev/null
$PIP install -q torch==2.13.0
# NATTEN builds from its sdist against the installed torch; optional (the pure-PyTorch fallback covers CPU).
$PIP install -q $C --no-build-isolation "natten>=0.20" || echo "install: natten unavailable; using the PyTorch neighborhood attention"
$PIP install -q $C \
  -e packages/core -e packages/backbone-dit -e packages/backbone-hdit -e packages/backbone-latte \
  -e packages/ext-gentron -e packages/runner-ray -e . \
  "pytest>=7" "import-linter>=2.17" "deptry>=0.25"
# No registry copy may shadow the checkout (dagster's guard).
if $VENV/bin/python -m pip list --exclude-editable 2>/dev/null | grep -iE '^dtx(-|\s)'; then
  echo "install: a non-editable dtx package shadows the checkout" >&2; exit 1
fi
echo "install: ok ($VENV)"
