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
#                          .nsys-rep (the H100 machine, see shared/tools/nsys-on-device.md), it
#                          converts it
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
GEN_SECONDS="${GEN_SECONDS:-0.25}"
BATCH="${BATCH:-1}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NSYS_BIN="${NSYS:-$(command -v nsys || true)}"
if [ -z "$NSYS_BIN" ] || [ ! -x "$NSYS_BIN" ]; then
  echo "error: nsys not found: put it on the PATH or set NSYS=/path/to/nsys" >&2
  echo "       (no Nsight Systems? python profiles/torch_profile.py generate --device cuda" >&2
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
rm -f "$REPORT.nsys-rep" "$REPORT.qdstrm"

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

CMD=("$PYTHON" -m sashimi.generate --checkpoint "$CKPT" --seconds "$GEN_SECONDS" --batch "$BATCH"
     --device cuda --out "$REPORT_DIR/samples_$NAME" "$@")
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
  echo "# nsys summary: sashimi.generate --seconds $GEN_SECONDS --batch $BATCH $* (checkpoint: ${CHECKPOINT:-paper preset, 1 training step${STEREO:+, stereo}})"
  echo "# date: $(date -u +%Y-%m-%dT%H:%MZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# device: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)' 2>/dev/null || echo unknown)"
  echo "# (includes model loading, setup_step and the first-step compilation: read the"
  echo "#  sashimi/generate/step range for the per-token figures)"
  echo
  "$NSYS_BIN" stats -r nvtx_sum,cuda_gpu_kern_sum --force-export=true "$REPORT.nsys-rep"
} > "$SUMMARY"
echo "== wrote $SUMMARY (report: $REPORT.nsys-rep)"
