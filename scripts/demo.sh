#!/usr/bin/env bash
# README's first command: install dtx (scripts/install.sh), train the class-conditional DiT on the embedded digits
# (`dtx train dit-digits`), sample ten of each digit with the EMA weights and score them with the shipped classifier.
# Extra arguments go to `dtx train` (e.g. `bash scripts/demo.sh --max-steps 200` for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${DTX_VENV:-.venv}"
OUT="${DTX_DEMO_OUT:-runs/dit-digits}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
"$VENV/bin/dtx" train dit-digits --out "$OUT" "$@"
"$VENV/bin/dtx" sample "$OUT" --n-per-class 10 --seed 0 --out "$OUT/samples/final.png"
"$VENV/bin/dtx" eval "$OUT/samples/final.npz"
echo "demo: run folder $OUT (config.yaml, checkpoints/, metrics.jsonl, samples/, loss.png)"
