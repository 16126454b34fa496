#!/usr/bin/env bash
# CI's second leg: install this package the way a researcher would, into an environment that
# already holds a torch other than the pinned one, and prove that pip keeps that torch; then run
#   1. the kernel tests on the Triton code under the interpreter (CPU),
#   2. the model, data, training, generation and console-script tests (reference paths, CPU),
#   3. a 20-step quickstart (train the tiny stereo model, generate 0.5 s) through the console scripts.
# The environment is a fresh virtual environment in a temporary folder, removed at the end.
# TORCH and TRITON choose what it holds first (default: torch 2.13.0, a CPU build, and triton
# 3.8.0); the rest of the dependencies come from pyproject.toml's ranges, not constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
TRITON=${TRITON:-triton==3.8.0}
export PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
t0=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
PY=$tmp/venv/bin/python
torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null; }

echo "== an environment that holds $TORCH and $TRITON"
"$PY" -m pip install --quiet "$TORCH" "$TRITON"
before=$(torch_version)
echo "== pip install '.[dev]' into it (torch $before there)"
"$PY" -m pip install --quiet ".[dev]"
after=$(torch_version)
if [ "$after" != "$before" ]; then
  echo "pip replaced torch $before by $after: the install must keep the environment's torch" >&2
  exit 1
fi
"$PY" -m pip check
echo "torch $after kept; $("$PY" -c 'import triton, numpy, soxr; print(f"triton {triton.__version__}, numpy {numpy.__version__}, soxr {soxr.__version__}")'); Python $("$PY" -c 'import platform; print(platform.python_version())')"
echo "installed in $((SECONDS - t0)) s"

run_pytest() {  # pytest's exit code 5 (nothing collected) is not a failure here
  set +e; "$PY" -m pytest -p no:cacheprovider "$@"; rc=$?; set -e
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then exit $rc; fi
}

echo "== kernel tests: Triton code under the interpreter, on CPU (torch $after)"
TRITON_INTERPRET=1 run_pytest -q -m interpreter --device=cpu tests
echo "== model, data, training, generation and console-script tests (torch $after)"
run_pytest -q -m "not interpreter" --device=cpu tests/test_model.py tests/test_s4.py tests/test_quantize.py \
  tests/test_data.py tests/test_train.py tests/test_generate.py tests/test_console_scripts.py
echo "== 20-step quickstart through the console scripts (torch $after)"
bin=$tmp/venv/bin
"$bin/sashimi-train" --stereo --preset tiny --steps 20 --val-every 20 --out "$tmp/quickstart"
"$bin/sashimi-generate" --checkpoint "$tmp/quickstart/checkpoint.pt" --seconds 0.5 --batch 1 --temperature 0.2 \
  --keep best --out "$tmp/quickstart/samples"
ls "$tmp"/quickstart/samples/*.wav > /dev/null
echo "second torch line (torch $after): every stage ok in $((SECONDS - t0)) s wall on $(nproc) cores"
