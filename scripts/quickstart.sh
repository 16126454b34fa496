#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the tiny stereo SaShiMi on the built-in
# synthetic music, and write a generated stereo WAV from the model it trained.
# Extra arguments go to the trainer (e.g. --steps 2000 --data /path/to/music).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/quickstart}
if [ -f "$OUT/checkpoint.pt" ]; then
  RESUME=--resume   # continue (or just reuse) the run that is there
else
  RESUME=
fi
"$PY" -m sashimi.train --stereo --preset tiny --steps ${STEPS:-300} --out "$OUT" $RESUME "$@"
"$PY" -m sashimi.generate --checkpoint "$OUT/checkpoint.pt" --seconds ${SECONDS_OUT:-2} --batch 2 --keep best --out "$OUT/samples"
