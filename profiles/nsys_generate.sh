#!/usr/bin/env bash
# Profile a short generation run under Nsight Systems and write a text summary.
#
#   bash profiles/nsys_generate.sh [extra sashimi.generate flags, e.g. --batch 16]
#
# Runs `python -m sashimi.generate --checkpoint CKPT --seconds $GEN_SECONDS --device cuda`
# under
#   nsys profile -t cuda,nvtx -s none --cpuctxsw=none
# then `nsys stats -r nvtx_sum,cuda_gpu_kern_sum` into profiles/${NAME}_summary.txt
# (NAME=generate, or generate_<suffix> with NAME_SUFFIX=...). Each token is one
# `sashimi/generate/step` NVTX range: its count and mean time are the per-step figures.
# Without CHECKPOINT, a paper-preset checkpoint is made first (1 training step, outside the
# profile): the weights do not matter for speed.
#
# Environment:
#   NSYS                   the nsys binary (default: nsys on the PATH)
#   NSYS_QDSTRM_IMPORTER   QdstrmImporter binary: when set, and nsys left a .qdstrm without a
#                          .nsys-rep (as on machines where nsys cannot finish the report
#                          itself), it converts it
#   PYTHON                 interpreter (default: .venv/bin/python, else python3)
#   CHECKPOINT             checkpoint to sample from (default: made as above)
#   STEREO=1               make the default checkpoint a stereo one
#   GEN_SECONDS            seconds of audio per sample (default 0.25: 4,000 frames at 16 kHz)
#   BATCH                  samples in parallel (default 1)
#   REPORT_DIR             where the .nsys-rep goes (default: a fresh temporary folder)
#   SUMMARY_DIR            where the summary goes (default: profiles/)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME="generate${NAME_SUFFIX:+_$NAME_SUFFIX}"
WORKLOAD=generate
GEN_SECONDS="${GEN_SECONDS:-0.25}"
BATCH="${BATCH:-1}"
source profiles/_nsys_common.sh
nsys_prepare

CKPT="${CHECKPOINT:-}"
if [ -z "$CKPT" ]; then
  CKPT_RUN="$REPORT_DIR/ckpt_$NAME"
  rm -rf "$CKPT_RUN"
  echo "== making a paper-preset checkpoint (1 step) in $CKPT_RUN"
  "$PYTHON" -m sashimi.train --preset paper --steps 1 --device cuda --out "$CKPT_RUN" \
    ${STEREO:+--stereo} > "$REPORT_DIR/ckpt_$NAME.log" 2>&1 \
    || { echo "error: making the checkpoint failed:" >&2; tail -20 "$REPORT_DIR/ckpt_$NAME.log" >&2; exit 1; }
  CKPT="$CKPT_RUN/checkpoint.pt"
fi
[ -f "$CKPT" ] || { echo "error: no checkpoint at $CKPT" >&2; exit 2; }

nsys_profile_and_summarise \
  "sashimi.generate --seconds $GEN_SECONDS --batch $BATCH $* (checkpoint: ${CHECKPOINT:-paper preset, 1 training step${STEREO:+, stereo}})" \
  "includes model loading, setup_step and the first-step compilation: read the sashimi/generate/step range for the per-token figures" \
  "$PYTHON" -m sashimi.generate --checkpoint "$CKPT" --seconds "$GEN_SECONDS" --batch "$BATCH" \
  --device cuda --out "$REPORT_DIR/samples_$NAME" "$@"
