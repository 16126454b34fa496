#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, train the tiny stereo SaShiMi on the built-in
# synthetic music (or --data DIR), and write a generated stereo WAV from the model this
# invocation trained. `bash scripts/quickstart.sh --help` says how re-runs and run folders work.
set -euo pipefail
cd "$(dirname "$0")/.."

steps_from_env=${STEPS:+yes}   # a STEPS of one's own, like a flag, gets a run folder of its own

# ================================ the recipe ================================================
# What the quickstart trains and how it samples (QUALITY.md has what each was measured against):
# the tiny preset (S4D, each tier's memory tied to its training window, so 2 s of generation
# stay music) at 8 kHz (half the steps per note of 16 kHz: at 16 kHz the same budget samples no
# notes), 600 steps, and sampling at temperature 0.2 (at 1.0 a model this young samples
# broadband noise), with a spectrogram beside the WAV. STEPS, SECONDS_OUT and TEMPERATURE may
# also be set from the environment.
STEPS=${STEPS:-600}
SECONDS_OUT=${SECONDS_OUT:-2}
TEMPERATURE=${TEMPERATURE:-0.2}
TRAIN_RECIPE=(--stereo --preset tiny --sample-rate 8000 --steps "$STEPS" --val-every "$STEPS")
GENERATE_RECIPE=(--seconds "$SECONDS_OUT" --batch 1 --temperature "$TEMPERATURE" --keep best --spectrogram)
# ============================================================================================

usage() {
  cat <<'EOF'
usage: bash scripts/quickstart.sh [--out RUN_DIR] [TRAINER FLAGS...]

Sets up .venv (scripts/setup.sh), trains the tiny stereo SaShiMi at 8 kHz (600 steps, about
4.5-5.5 minutes on a 2-core CPU) and writes a generated stereo WAV, and its spectrogram, from
the model it trained. Any other flag
goes to the trainer (python -m sashimi.train --help lists them), e.g.
    bash scripts/quickstart.sh --data ~/music --steps 5000

Run folders. With no trainer flags the run is runs/quickstart/; with flags (or STEPS), a
folder named after them (runs/quickstart-<hash>/), so that each set of flags has its own run. --out RUN_DIR
(or OUT=RUN_DIR in the environment) picks the folder yourself. A re-run with the same flags
continues that run (an interrupted one resumes; a finished one is reused: "already trained
to step N; generating"). A run folder trained with other flags is never reused: the script
stops with one line and exit code 2.

Environment: OUT (the run folder), STEPS (600), SECONDS_OUT (2, seconds generated),
TEMPERATURE (0.2), RUNS (runs, where the default run folders go), SASHIMI_PY (a Python that
already has sashimi-triton installed: skips the set-up).
EOF
}

# --- the arguments: ours (--help, --out), the rest for the trainer
OUT=${OUT:-}
user=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "quickstart: error: --out needs a folder" >&2; exit 2; }
           OUT=$2; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    --resume) echo "quickstart: note: --resume is not needed (a re-run with the same flags continues its run)"
              shift ;;
    *) user+=("$1"); shift ;;
  esac
done

start=$(date +%s)
if [ -n "${SASHIMI_PY:-}" ]; then
  PY=$SASHIMI_PY
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi

# --- the run folder and what it was trained with
train_args=("${TRAIN_RECIPE[@]}" ${user[@]+"${user[@]}"})
identity=$(printf '%q ' "${train_args[@]}")
if [ -z "$OUT" ]; then
  if [ ${#user[@]} -eq 0 ] && [ -z "$steps_from_env" ]; then
    OUT=${RUNS:-runs}/quickstart
  else
    OUT=${RUNS:-runs}/quickstart-$(printf '%s' "$identity" | sha256sum | cut -c1-8)
  fi
fi
ckpt=$OUT/checkpoint.pt
args_file=$OUT/quickstart-args.txt     # the trainer flags this folder's run was made with

if [ -f "$ckpt" ] && { [ ! -f "$args_file" ] || [ "$(cat "$args_file")" != "$identity" ]; }; then
  if [ -f "$args_file" ]; then
    was="was trained with other flags ($(cat "$args_file"))"
  else
    was="holds a run that quickstart.sh did not start"
  fi
  echo "quickstart: error: $OUT $was; pass another --out (or delete $OUT) for this run" >&2
  exit 2
fi

resume=()
if [ -f "$ckpt" ]; then
  # "<step> <steps>" of the run there (a checkpoint that does not load stops here, one line)
  read -r step steps < <("$PY" -c 'import sys
from sashimi import checkpoint
try:
    p = checkpoint.load(sys.argv[1])
    print(p["step"], p["train_config"]["steps"])
except Exception as e:
    sys.exit(f"quickstart: error: {sys.argv[1]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")' "$ckpt") \
    || exit 2
  if [ "$step" -lt "$steps" ]; then
    echo "quickstart: continuing the interrupted run in $OUT (step $step of $steps)"
    resume=(--resume)
  fi
fi
if [ -f "$ckpt" ] && [ ${#resume[@]} -eq 0 ]; then
  echo "quickstart: $OUT already trained to step $step; generating"
else
  mkdir -p "$OUT"
  printf '%s' "$identity" > "$args_file"
  # a failed or refused training stops here (set -e): nothing is generated from another model
  "$PY" -m sashimi.train "${train_args[@]}" --out "$OUT" ${resume[@]+"${resume[@]}"}
fi

"$PY" -m sashimi.generate --checkpoint "$ckpt" "${GENERATE_RECIPE[@]}" --out "$OUT/samples"
echo "quickstart: $(( $(date +%s) - start )) s (run folder $OUT)"
