#!/usr/bin/env bash
# Profile a short training run under Nsight Systems and write a text summary.
#
#   bash profiles/nsys_train.sh [extra sashimi.train flags, e.g. --stereo --precision bf16]
#
# Runs `python -m sashimi.train --preset paper --steps $STEPS --device cuda` (STEPS=20 by
# default; no validation or checkpoint until the last step) under
#   nsys profile -t cuda,nvtx -s none --cpuctxsw=none
# then `nsys stats -r nvtx_sum,cuda_gpu_kern_sum` into profiles/${NAME}_summary.txt
# (NAME=train, or train_<suffix> with NAME_SUFFIX=...). The NVTX ranges are listed in
# profiles/README.md. Only the text summary is meant to be committed, never the report.
#
# Environment:
#   NSYS                   the nsys binary (default: nsys on the PATH)
#   NSYS_QDSTRM_IMPORTER   QdstrmImporter binary: when set, and nsys left a .qdstrm without a
#                          .nsys-rep (as on machines where nsys cannot finish the report
#                          itself), it converts it
#   PYTHON                 interpreter (default: .venv/bin/python, else python3)
#   STEPS                  training steps (default 20)
#   REPORT_DIR             where the .nsys-rep goes (default: a fresh temporary folder)
#   SUMMARY_DIR            where the summary goes (default: profiles/)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME="train${NAME_SUFFIX:+_$NAME_SUFFIX}"
WORKLOAD=train
STEPS="${STEPS:-20}"
source profiles/_nsys_common.sh
nsys_prepare
RUN_DIR="$REPORT_DIR/run_$NAME"
rm -rf "$RUN_DIR"

nsys_profile_and_summarise "sashimi.train --preset paper --steps $STEPS $*" \
  "the run includes start-up, the first-step compilation/autotuning and the final validation + checkpoint: read the per-range figures of sashimi/train/*" \
  "$PYTHON" -m sashimi.train --preset paper --steps "$STEPS" --device cuda --out "$RUN_DIR" \
  --val-every 1000000 --checkpoint-every 1000000 "$@"
