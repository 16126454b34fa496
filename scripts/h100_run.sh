#!/usr/bin/env bash
# The GPU session's check-and-benchmark run, one device call per stage (each fits in the
# 10-minute limit of a call), results under $OUT. Before: `bash scripts/device_wheels.sh` here
# (downloads what the GPU machine lacks into wheels/), then a device call such as
#     bash scripts/h100_run.sh tests            carry: ["wheels"]
#     bash scripts/h100_run.sh bench-kernels    carry: ["wheels"]
#     bash scripts/h100_run.sh bench-model      carry: ["wheels"]
#     bash scripts/h100_run.sh profiles         carry: ["wheels", ".deb"]  (nsys: shared/tools/nsys-on-device.md)
# Stages write $OUT/<stage>.txt (and .json for benchmarks). Afterwards, here:
#     python scripts/make_benchmarks.py merged.json   (merge the bench_*.json with scripts/merge_bench_json.py)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sashimi_out}
mkdir -p "$OUT"
PY=${PY:-python3}
stage=${1:?stage: tests | bench-kernels | bench-model | profiles}
if [ -d wheels ]; then
  "$PY" -m pip install -q --no-index --find-links wheels nvtx soundfile hypothesis pytest-benchmark \
    tqdm matplotlib > "$OUT/pip.txt" 2>&1 || tail -5 "$OUT/pip.txt"
fi
export PYTHONPATH=$PWD HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-interp}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; "$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__)'; date -u; } > "$OUT/device.txt" 2>&1

case "$stage" in
  tests)
    # compile + autotune dominate a first run: the interp hypothesis profile keeps examples few
    "$PY" -m kernels.selftest > "$OUT/tests.txt" 2>&1
    timeout 500 "$PY" -m pytest -q -p no:cacheprovider --device cuda -m "interpreter or gpu" \
      -x --durations=15 tests >> "$OUT/tests.txt" 2>&1
    tail -40 "$OUT/tests.txt"
    ;;
  bench-kernels)
    timeout 560 "$PY" -m pytest -q -p no:cacheprovider --benchmark-only \
      --benchmark-json "$OUT/bench_kernels.json" bench/test_cauchy.py bench/test_vandermonde.py \
      bench/test_embed_interleave.py bench/test_steps.py bench/test_tier_step.py > "$OUT/bench-kernels.txt" 2>&1
    tail -60 "$OUT/bench-kernels.txt"
    ;;
  bench-model)
    timeout 560 "$PY" -m pytest -q -p no:cacheprovider --benchmark-only \
      --benchmark-json "$OUT/bench_model.json" bench/test_train_step.py bench/test_generation.py \
      bench/test_data.py > "$OUT/bench-model.txt" 2>&1
    tail -60 "$OUT/bench-model.txt"
    ;;
  profiles)
    if [ -d .deb ]; then
      mkdir -p /tmp/dw && for f in .deb/*.deb; do dpkg -x "$f" /tmp/dw; done
      export LD_LIBRARY_PATH=/tmp/dw/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
    fi
    export NSYS=${NSYS:-/opt/nvidia/nsight-compute/2025.3.1/host/target-linux-x64/nsys}
    export NSYS_QDSTRM_IMPORTER=${NSYS_QDSTRM_IMPORTER:-/opt/nvidia/nsight-compute/2025.3.1/host/linux-desktop-glibc_2_11_3-x64/QdstrmImporter}
    timeout 280 bash profiles/nsys_train.sh > "$OUT/profiles.txt" 2>&1
    timeout 280 bash profiles/nsys_generate.sh >> "$OUT/profiles.txt" 2>&1
    cp profiles/*_summary.txt "$OUT/" 2>/dev/null
    tail -40 "$OUT/profiles.txt"
    ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
