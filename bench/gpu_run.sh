#!/usr/bin/env bash
# Everything one GPU session needs, in one command (run from the repository root, e.g. through the
# device tool): build the extension with CUDA on that machine, run the op tests (CUDA cases
# included), and write the benchmark table. Results go to $OUT (default bench/results/gpu-run).
#   bash bench/gpu_run.sh                  # build, tests, bench: one device command (timeout_s 600)
#   bash bench/gpu_run.sh tests bench      # rerun stages on a still-warm build
#   bash bench/gpu_run.sh bench-cpu        # the CPU table on that machine's cores (not by default)
# A session has 15 device-minutes in all (the machine's start included), so the default is one call:
# the whole script keeps within DEADLINE seconds (default 560, under the tool's 600 s per command),
# every step's time limit is cut to what is left, and each step writes its log under $OUT at once, so
# a step that runs out of time (or a kernel that hangs) costs that step, not the results before it.
# Needs torch (a CUDA build), nvcc, ninja and pytest (the device image has them: torch 2.11+cu130,
# against which this build was checked). PYTHON picks the interpreter (default python3).
set -euo pipefail
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # the machine has no network: never wait on a hub lookup
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS (bitwise tests)
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-run}
STAGES=${*:-build tests bench}
mkdir -p "$OUT"
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  [ -x "$nvcc_path" ] || { echo "gpu_run.sh: no nvcc on PATH or in /usr/local/cuda: set CUDA_HOME" >&2; exit 1; }
  if grep -qs '^exec ' "$nvcc_path"; then CUDA_HOME=$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$nvcc_path")
  else CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$nvcc_path")")"); fi
  export CUDA_HOME
fi
stage() { echo "== $1: $(( $(date +%s) - start )) s" | tee -a "$OUT/env.txt"; }
start=$(date +%s)
DEADLINE=${DEADLINE:-560}
# limit SECONDS: the step's own limit, cut to what the deadline leaves (at least 1)
limit() { local left=$(( DEADLINE - ($(date +%s) - start) )); (( left < $1 )) && set -- "$left"; (( $1 < 1 )) && set -- 1; echo "$1"; }
# run_tests NAME CAP LOG TAIL PYTEST_ARGS...: one pytest run under the deadline, its log under $OUT;
# a failure or timeout is reported in the stage line and the script goes on to the next stage
run_tests() {
  local name=$1 cap=$2 log=$3 n=$4 rc
  shift 4
  set +e
  timeout "$(limit "$cap")" $PY -m pytest "$@" -q -rs -p no:cacheprovider > "$OUT/$log" 2>&1
  rc=$?
  set -e
  tail -"$n" "$OUT/$log"
  stage "$name (rc=$rc; 124 = timed out)"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -c 'import torch; c = torch.cuda.is_available(); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if c else "NO GPU VISIBLE")' \
  | tee -a "$OUT/env.txt"

if [[ " $STAGES " == *" build "* ]]; then
  SUBSPACE_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} timeout "$(limit 300)" $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  stage build
fi
$PY -c 'import subspace_ext as se; assert se.cuda_enabled(), "not a CUDA build: run the build stage"'

# Order: op tests, then the bench (the table issue 3 needs), then the method tests with what is left.
# run_file FILE: the op tests of one file. If pytest crashes (segfault, abort), the test it was in
# (tests/conftest.py writes each test's id to $SUBSPACE_EXT_TEST_TRACE as it starts) is deselected
# and the rest of the file runs again, at most 3 times a file. Where gdb is present, the first
# crashed test is re-run under it afterwards for a native backtrace ($OUT/gdb.txt).
crashed=()
export SUBSPACE_EXT_TEST_TRACE="$OUT/.current-test"
run_file() {
  local f=$1 log="$OUT/tests-$(basename "$1" .py).txt" rc=0 id tries
  local deselect=()
  for tries in 1 2 3 4; do
    local left=$(( ops_end - $(date +%s) ))  # the op tests together stop by ops_end (the bench comes next)
    (( left < 1 )) && { echo "== op tests out of time: $f skipped" | tee -a "$log" "$OUT/env.txt"; break; }
    rm -f "$SUBSPACE_EXT_TEST_TRACE"
    set +e
    timeout "$(limit $(( left < 120 ? left : 120 )))" $PY -m pytest "$f" ${deselect[@]+"${deselect[@]}"} -q -rs -p no:cacheprovider >> "$log" 2>&1
    rc=$?
    set -e
    (( rc == 139 || rc == 134 )) && [ -s "$SUBSPACE_EXT_TEST_TRACE" ] && (( tries < 4 )) || break
    id=$(cat "$SUBSPACE_EXT_TEST_TRACE")
    echo "== CRASH (rc=$rc) in $id: deselected, the rest of the file again" | tee -a "$log" "$OUT/env.txt"
    crashed+=("$id")
    deselect+=(--deselect "$id")
  done
  grep -E '^(FAILED|ERROR)|^=* ?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)' "$log" | tail -8 || true
  stage "op tests $(basename "$f") (rc=$rc; 124 = timed out; crashes: $(( ${#deselect[@]} / 2 )))"
}
if [[ " $STAGES " == *" tests "* ]]; then
  # Every op test on both devices, file by file.
  { ldd subspace_ext/_C*.so | grep -E 'omp|torch|c10|cuda'; ls "$($PY -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib"; } \
    > "$OUT/libs.txt" 2>&1 || true
  ops_end=$(( $(date +%s) + 240 ))
  for f in tests/test_philox.py tests/test_importance.py tests/test_rsvd.py tests/test_small_svd.py \
           tests/test_project.py tests/test_opcheck.py tests/test_errors.py; do run_file "$f"; done
  if (( ${#crashed[@]} )) && command -v gdb > /dev/null; then
    unset SUBSPACE_EXT_TEST_TRACE
    # the whole file up to the crash: it may need the tests before it (CUDA state, the heap)
    timeout "$(limit 60)" gdb -q -batch -ex run -ex bt -ex 'info sharedlibrary' --args $PY -m pytest -x -q \
      -p no:cacheprovider "${crashed[0]%%::*}" > "$OUT/gdb.txt" 2>&1 || true
    grep -A30 -m1 'SIG' "$OUT/gdb.txt" | head -40 || true
  fi
fi

bench_rc=0
if [[ " $STAGES " == *" bench "* ]]; then
  timeout "$(limit 300)" $PY -m subspace_ext.cli bench --device cuda --large --output "$OUT/bench.md" > "$OUT/bench.log" 2>&1 \
    || { bench_rc=$?; tail -30 "$OUT/bench.log"; }
  stage "bench-cuda (rc=$bench_rc)"
  [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
fi

if [[ " $STAGES " == *" tests "* ]]; then
  # The CUDA cases of the method tests (they skip what the machine lacks, e.g. the bundled MiniLM
  # package, with the reason in the log).
  run_tests "method tests" 120 tests_methods.txt 5 tests/test_eigenlorax.py tests/test_srlora.py tests/test_solar.py -k cuda
fi

if [[ " $STAGES " == *" bench-cpu "* ]]; then
  timeout "$(limit 180)" $PY -m subspace_ext.cli bench --device cpu --threads "$(nproc)" --output "$OUT/bench_cpu.md" \
    > /dev/null || echo "bench-cpu failed or timed out (rc=$?)" | tee -a "$OUT/env.txt"
  stage bench-cpu
fi
exit "$bench_rc"
