#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs
#   1. the kernel tests on the Triton code (on CPU under TRITON_INTERPRET=1 when there is no GPU),
#   2. everything else (model, data, training, generation) on the reference paths,
#   2b. (no GPU) the rehearsal of the GPU session's check, `python -m bench.gpu_check --dry-run`,
#   3. the self-test, the sm_90 compile check of every kernel config (no GPU needed), and the
#      benchmark suite (which skips cleanly without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run_pytest() {  # pytest's exit code 5 (nothing collected) is not a failure here
  set +e; "$PY" -m pytest "$@"; rc=$?; set -e
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then exit $rc; fi
}

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "== kernel and model tests on the GPU"
  run_pytest -q tests "$@"
  echo "== self-test (Triton on the GPU)"
  "$PY" -m kernels.selftest
else
  echo "== kernel tests: Triton code under the interpreter, on CPU"
  TRITON_INTERPRET=1 run_pytest -q -m interpreter --device=cpu tests "$@"
  echo "== the GPU session's one-call check, rehearsed on CPU: python -m bench.gpu_check --dry-run"
  gc_out=$(mktemp -d); gc_t0=$SECONDS
  if ! "$PY" -m bench.gpu_check --dry-run --out "$gc_out" > "$gc_out.log" 2>&1; then cat "$gc_out.log"; exit 1; fi
  echo "gpu_check --dry-run: every stage ok in $((SECONDS - gc_t0)) s wall on $(nproc) cores ($gc_out)"
  export GPU_CHECK_DRY_RUN_OUT=$gc_out   # tests/test_gpu_check.py checks this run's results
  echo "== model, data, training and generation tests (reference paths, CPU)"
  run_pytest -q -m "not interpreter" --device=cpu tests "$@"
  echo "== self-test (Triton under the interpreter)"
  TRITON_INTERPRET=1 "$PY" -m kernels.selftest
  echo "== every kernel and autotune config compiles for the H100 (sm_90, no GPU needed)"
  aot_log=$(mktemp)
  # + the static gate: no new spill, hot loops <= 10% longer than bench/baselines/sm90_static.json
  if "$PY" scripts/aot_check.py > "$aot_log" 2>&1; then tail -n 2 "$aot_log"; else cat "$aot_log"; exit 1; fi
fi
echo "== benchmarks (skip without a GPU)"
run_pytest -q bench --benchmark-only -p no:cacheprovider
