#!/usr/bin/env bash
# Create a virtual environment (default .venv, or $DTX_VENV) and install dtx from this checkout, one line per stage.
# CPU torch is pinned here only (the wheel on these machines); the packages themselves ask for torch>=2.5.
# DTX_INSTALL=all (default): every package editable, NATTEN and the test tools. DTX_INSTALL=demo: dtx-core and
# dtx-backbone-dit only (what `dtx train dit-digits` needs), no NATTEN build, no Ray: scripts/demo.sh uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DTX_VENV:-.venv}"
PY="${PYTHON:-python3}"
PROFILE="${DTX_INSTALL:-all}"
PIP="$VENV/bin/python -m pip"
C="-c .ci/constraints.txt"
START=$SECONDS
stage() { echo "install: [$((SECONDS - START))s] $*"; }

case "$PROFILE" in all|demo) ;; *) echo "install: DTX_INSTALL must be all or demo, got '$PROFILE'" >&2; exit 2 ;; esac
if [ -x "$VENV/bin/python" ]; then stage "using $VENV"; else stage "creating $VENV"; "$PY" -m venv "$VENV"; fi
stage "pip, setuptools, wheel"
$PIP install -q --upgrade pip setuptools wheel >/dev/null
stage "torch 2.13.0 (CPU wheel, the largest download)"
$PIP install -q torch==2.13.0
if [ "$PROFILE" = demo ]; then
  stage "dtx-core and dtx-backbone-dit (editable) with their dependencies"
  $PIP install -q $C -e packages/core -e packages/backbone-dit
else
  # NATTEN builds from its sdist against the installed torch; optional (the pure-PyTorch fallback covers CPU).
  stage "natten (built from source against torch; optional, a few minutes the first time)"
  $PIP install -q $C --no-build-isolation "natten>=0.20" || echo "install: natten unavailable; using the PyTorch neighborhood attention"
  stage "every dtx package (editable), Ray, diffusers, transformers and the test tools"
  $PIP install -q $C \
    -e packages/core -e packages/backbone-dit -e packages/backbone-hdit -e packages/backbone-latte \
    -e packages/ext-gentron -e packages/runner-ray -e . \
    "pytest>=7" "import-linter>=2.17" "deptry>=0.25"
fi
# No registry copy may shadow the checkout (dagster's guard).
if $VENV/bin/python -m pip list --exclude-editable 2>/dev/null | grep -iE '^dtx(-|\s)'; then
  echo "install: a non-editable dtx package shadows the checkout" >&2; exit 1
fi
stage "ok ($VENV, $PROFILE)"
