#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the tiny stereo SaShiMi on the built-in
# synthetic music, and write a generated stereo WAV from the model it trained.
# Extra arguments go to the trainer (e.g. --steps 2000 --data /path/to/music).
# Defaults (QUALITY.md has what each was measured against): the tiny preset (S4D, each tier's
# memory tied to its training window, so 2 s of generation stay music) at 8 kHz (half the steps
# per note of 16 kHz: at 16 kHz the same budget samples no notes), 600 steps, and sampling at
# temperature 0.2 (at 1.0 a model this young samples broadband noise).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/quickstart}
if [ -f "$OUT/checkpoint.pt" ]; then
  RESUME=--resume   # continue (or just reuse) the run that is there
else
  RESUME=
fi
# (on a rerun whose checkpoint already holds every step, the trainer says so and the checkpoint is reused)
"$PY" -m sashimi.train --stereo --preset tiny --sample-rate 8000 --steps ${STEPS:-600} --val-every ${STEPS:-600} --out "$OUT" $RESUME "$@" \
  || [ -n "$RESUME" ]
"$PY" -m sashimi.generate --checkpoint "$OUT/checkpoint.pt" --seconds ${SECONDS_OUT:-2} --batch 1 \
  --temperature ${TEMPERATURE:-0.2} --keep best --spectrogram --out "$OUT/samples"
echo "quickstart: $(( $(date +%s) - start )) s"
