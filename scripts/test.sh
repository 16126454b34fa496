#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs, each stage announced with the time it
# takes on a quiet 2-core CPU and closed with the wall and CPU time it took here:
#   1. the kernel tests on the Triton code (on CPU under TRITON_INTERPRET=1 when there is no GPU),
#   2. (no GPU) the rehearsal of the GPU session's check, `python -m bench.gpu_check --dry-run`,
#   3. everything else (model, data, training, generation) on the reference paths,
#   4. the self-test, the sm_90 compile check of every kernel config (no GPU needed), and the
#      benchmark suite (which skips cleanly without a GPU).
# The expected times are the stages' single-process times on a quiet 2-core CPU, halved where two
# processes share the work (README.md has what a whole run measured).
# Without a GPU, pytest runs on every core (pytest-xdist, one process per core, whole files
# per process: module fixtures are made once); JOBS=1 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export PYTHONHASHSEED=0
JOBS=${JOBS:-$(nproc)}

run_pytest() {  # pytest's exit code 5 (nothing collected) is not a failure here
  set +e; "$PY" -m pytest "$@"; rc=$?; set -e
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then exit $rc; fi
}
parallel=()
if [ "$JOBS" -gt 1 ]; then
  parallel=(-n "$JOBS" --dist loadfile)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process: JOBS processes fill the cores
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi

cpu_file=$(mktemp)
cpu_now() {  # cpu_s = CPU seconds (user + sys) of the finished child processes so far (`times`, in this shell)
  times > "$cpu_file"
  cpu_s=$(awk 'END { t = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); t += p[1] * 60 + p[2] } printf "%.0f", t }' "$cpu_file")
}
stage_no=0
stage() {  # stage NAME EXPECTED: announce it; stage_done closes it with what it took here
  stage_no=$((stage_no + 1)); stage_name=$1; stage_t0=$SECONDS; cpu_now; stage_cpu0=$cpu_s
  echo "== [$stage_no/$stages] $1 ($2)"
}
stage_done() {
  cpu_now
  echo "   $((SECONDS - stage_t0)) s wall, $((cpu_s - stage_cpu0)) s CPU: $stage_name"
}
total_t0=$SECONDS

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  stages=3
  stage "kernel and model tests on the GPU" "its time on a GPU is not measured yet"
  run_pytest -q tests "$@"
  stage_done
  stage "self-test (Triton on the GPU)" "its time on a GPU is not measured yet"
  "$PY" -m kernels.selftest
  stage_done
else
  stages=6
  stage "kernel tests: Triton code under the interpreter, on CPU ($JOBS processes)" "about 1 min on a quiet 2-core CPU"
  TRITON_INTERPRET=1 run_pytest -q "${parallel[@]}" -m interpreter --device=cpu tests "$@"
  stage_done
  stage "the GPU session's one-call check, rehearsed on CPU: python -m bench.gpu_check --dry-run" "about 35 s"
  gc_out=$(mktemp -d)
  if ! "$PY" -m bench.gpu_check --dry-run --out "$gc_out" 2>&1 | tee "$gc_out.log" | sed 's/^/   /'; then
    exit 1
  fi
  export GPU_CHECK_DRY_RUN_OUT=$gc_out   # tests/test_gpu_check.py checks this run's results
  stage_done
  stage "model, data, training and generation tests (reference paths, CPU, $JOBS processes)" "about 2 min"
  run_pytest -q "${parallel[@]}" -m "not interpreter" --device=cpu tests "$@"
  stage_done
  stage "self-test (Triton under the interpreter)" "about 15 s"
  TRITON_INTERPRET=1 "$PY" -m kernels.selftest
  stage_done
  stage "every kernel and autotune config compiles for the H100 (sm_90, no GPU needed; a line per op)" "about 2.5 min; seconds when the kernels have not changed since the last run"
  # + the static gate: no new spill, hot loops <= 10% longer than bench/baselines/sm90_static.json
  aot_log=$(mktemp)   # the whole table; shown here: its progress lines and verdict (all of it on a failure)
  if ! "$PY" scripts/aot_check.py --jobs "$JOBS" 2>&1 | tee "$aot_log" \
      | { grep --line-buffered -E '^([0-9]+ launch configurations|  [a-z_]+: [0-9]+ compiles|  \.\.\. )' || true; }
  then
    cat "$aot_log"; exit 1
  fi
  tail -n 2 "$aot_log"
  stage_done
fi
stage "benchmarks (skip without a GPU)" "about 10 s"
run_pytest -q bench --benchmark-only -p no:cacheprovider
stage_done
cpu_now
echo "== all stages passed in $((SECONDS - total_t0)) s wall, $cpu_s s CPU, on $(nproc) cores (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
