#!/usr/bin/env bash
# README's first command: install dtx-core and dtx-backbone-dit (scripts/install.sh, DTX_INSTALL=demo unless set),
# train the class-conditional DiT on the embedded digits in one process (`dtx train dit-digits`), sample 50 of each
# digit with the EMA weights (the README's 500 samples) and score them with the shipped classifier.
# Extra arguments go to `dtx train` (e.g. `bash scripts/demo.sh --max-steps 200` for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
phase() { echo "demo: [$((SECONDS - START))s] $*"; }
phase "installing (scripts/install.sh)"
DTX_INSTALL="${DTX_INSTALL:-demo}" bash scripts/install.sh
VENV="${DTX_VENV:-.venv}"
OUT="${DTX_DEMO_OUT:-runs/dit-digits}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
phase "training dit-digits into $OUT (1200 steps; re-running resumes)"
"$VENV/bin/dtx" train dit-digits --out "$OUT" "$@"
phase "sampling 50 of each digit (500 samples) with the EMA weights"
"$VENV/bin/dtx" sample "$OUT" --n-per-class 50 --seed 0 --progress --out "$OUT/samples/final.png"
phase "scoring the samples with the shipped digits classifier"
"$VENV/bin/dtx" eval "$OUT/samples/final.npz"
phase "done: run folder $OUT (config.yaml, checkpoints/, metrics.jsonl, samples/, loss.png)"
