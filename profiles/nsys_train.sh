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
#                          .nsys-rep (the H100 machine, see shared/tools/nsys-on-device.md), it
#                          converts it
#   PYTHON                 interpreter (default: .venv/bin/python, else python3)
#   STEPS                  training steps (default 20)
#   REPORT_DIR             where the .nsys-rep goes (default: a fresh temporary folder)
#   SUMMARY_DIR            where the summary goes (default: profiles/)
set -euo pipefail
cd "$(dirname "$0")/.."

NAME="train${NAME_SUFFIX:+_$NAME_SUFFIX}"
STEPS="${STEPS:-20}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NSYS_BIN="${NSYS:-$(command -v nsys || true)}"
if [ -z "$NSYS_BIN" ] || [ ! -x "$NSYS_BIN" ]; then
  echo "error: nsys not found: put it on the PATH or set NSYS=/path/to/nsys" >&2
  echo "       (no Nsight Systems? python profiles/torch_profile.py train --device cuda" >&2
  echo "        gives a torch.profiler table and a Chrome trace instead)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import nvtx' 2>/dev/null; then
  echo "warning: the Python nvtx package is not installed for $PYTHON: the summary will have no" >&2
  echo "         sashimi/* NVTX ranges, only kernels (pip install nvtx)" >&2
fi
REPORT_DIR="${REPORT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sashimi_nsys.XXXXXX")}"
SUMMARY_DIR="${SUMMARY_DIR:-profiles}"
mkdir -p "$REPORT_DIR" "$SUMMARY_DIR"
REPORT="$REPORT_DIR/$NAME"
RUN_DIR="$REPORT_DIR/run_$NAME"
rm -rf "$RUN_DIR" "$REPORT.nsys-rep" "$REPORT.qdstrm"

CMD=("$PYTHON" -m sashimi.train --preset paper --steps "$STEPS" --device cuda --out "$RUN_DIR"
     --val-every 1000000 --checkpoint-every 1000000 "$@")
echo "== nsys profile: ${CMD[*]}"
# nsys may exit non-zero after a complete capture ("ShutdownRequest"): judge by the files
set +e
"$NSYS_BIN" profile -t cuda,nvtx -s none --cpuctxsw=none -o "$REPORT" --force-overwrite true "${CMD[@]}"
rc=$?
set -e

if [ ! -f "$REPORT.nsys-rep" ] && [ -f "$REPORT.qdstrm" ] && [ -n "${NSYS_QDSTRM_IMPORTER:-}" ]; then
  echo "== QdstrmImporter: $REPORT.qdstrm -> $REPORT.nsys-rep"
  "$NSYS_QDSTRM_IMPORTER" -i "$REPORT.qdstrm"
fi
if [ ! -f "$REPORT.nsys-rep" ]; then
  echo "error: nsys wrote no $REPORT.nsys-rep (profile exit status $rc)" >&2
  [ -f "$REPORT.qdstrm" ] && echo "       a $REPORT.qdstrm exists: set NSYS_QDSTRM_IMPORTER to convert it" >&2
  exit 1
fi

SUMMARY="$SUMMARY_DIR/${NAME}_summary.txt"
{
  echo "# nsys summary: sashimi.train --preset paper --steps $STEPS $*"
  echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# device: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)' 2>/dev/null || echo unknown)"
  echo "# (the run includes start-up, the first-step compilation/autotuning and the final"
  echo "#  validation + checkpoint: read the per-range figures of sashimi/train/*)"
  echo
  "$NSYS_BIN" stats -r nvtx_sum,cuda_gpu_kern_sum --force-export=true "$REPORT.nsys-rep"
} > "$SUMMARY"
echo "== wrote $SUMMARY (report: $REPORT.nsys-rep)"
