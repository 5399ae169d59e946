#!/usr/bin/env bash
# tools/gpu_check.sh: does amp_fused work on this GPU, and how fast? One command, about 8 minutes at most.
#
#   tools/gpu_check.sh                 on a GPU machine (make gpu-check)
#   tools/gpu_check.sh --dry-run       anywhere: the same harness on CPU tensors, no build (make gpu-check-dry)
#   options: --steps env,build,...     run only these steps (the others show as SKIP)
#            --out DIR                 logs and JSON here (default: $OUT when set, else a new temporary folder)
#            --budget SECONDS          total time for all steps (default 465; dry run 300)
#   environment: PYTHON (default python3: the machine's own, nothing is installed), CUDA_HOME (else detected
#            from torch or `which nvcc`), GPU_CHECK_ARCH (default 9.0: sm_90 machine code, the H200),
#            GPU_CHECK_PYTEST_WORKERS (pytest-xdist workers for the CUDA tests when xdist is there; default 8, 0: off)
#
# Steps, each under its own timeout, each printing PASS, FAIL or SKIP; the summary table comes last:
#   env               GPU, driver, CUDA runtime, torch, triton, python, nvcc, compute-sanitizer versions
#   build             setup.py build_ext --inplace with AMP_FUSED_CUDA=1, TORCH_CUDA_ARCH_LIST=$GPU_CHECK_ARCH and
#                     AMP_FUSED_NVCC_FLAGS="-Xptxas -v"; FAIL on any ptxas spill (tools/ptxas_report.py), then
#                     amp_fused.available_backends('cuda') must hold cuda and triton
#   cuda-tests        python3 -m pytest -q -m cuda tests (tests/triton is interpreter-only and is not run)
#   triton-gpu-tests  python3 -m pytest -q tests/test_triton_gpu.py (SKIP while the file does not exist)
#   stress            tools/gpu_stress.py: chunk carry-over across launches, a 2^31 + 4097-element bf16 tensor,
#                     unaligned views, overlap rejection; cuda and triton against foreach; the step ops and the
#                     gradient-reuse ops (norms, restore_orthogonal_, add_orthogonal_)
#   sanitizer         compute-sanitizer memcheck, racecheck, initcheck on tools/gpu_sanitize_driver.py
#   bandwidth         tools/gpu_bandwidth.py: GB/s of the ops against a device copy; targets beside them (the
#                     gradient-reuse ops last, on one_256M and vit_b_16)
#   The dry run's tools test the cpu backend, or where it is unavailable (CPU kernels lagging the op table) its
#   kernels that exist with foreach for the rest (tools/gpu_check_util.py dry_backend); the build step says so.
# Files (at most 8) in the output folder: build.log tests.log run.log sanitizer.log stress.json bandwidth.json
# summary.json summary.txt. Exit status 0 when no step FAILs.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
DRY=0
SELECTED=""
OUTDIR=${OUT:-}
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) SELECTED=$2; shift ;;
    --steps=*) SELECTED=${1#*=} ;;
    --out) OUTDIR=$2; shift ;;
    --out=*) OUTDIR=${1#*=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)"; exit 2 ;;
  esac
  shift
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
[ -n "$OUTDIR" ] || OUTDIR="$WORK/out"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BUILD_LOG=$OUTDIR/build.log TESTS_LOG=$OUTDIR/tests.log RUN_LOG=$OUTDIR/run.log SAN_LOG=$OUTDIR/sanitizer.log
: >"$BUILD_LOG"; : >"$TESTS_LOG"; : >"$RUN_LOG"; : >"$SAN_LOG"
: >"$WORK/steps.tsv"

STEPS=(env build cuda-tests triton-gpu-tests stress sanitizer bandwidth)
if [ "$DRY" = 1 ]; then
  MODE=dry-run; NOMINAL=(20 30 60 60 60 10 60); DRYFLAG=(--dry-run); : "${BUDGET:=300}"
else
  MODE=gpu; NOMINAL=(25 160 80 35 50 55 60); DRYFLAG=(); : "${BUDGET:=465}"
fi
START=$(date +%s)

now() { date +%s.%N; }
elapsed() { echo $(( $(date +%s) - START )); }
selected() { [ -z "$SELECTED" ] || [[ ",$SELECTED," == *",$1,"* ]]; }

# The timeout of step i: what is left of the budget after the later selected steps' nominal times, between the
# step's nominal time (it never gets less unless the budget is spent) and 3 times that.
step_timeout() {
  local i=$1 later=0 j
  for ((j = i + 1; j < ${#STEPS[@]}; j++)); do
    selected "${STEPS[j]}" && later=$((later + NOMINAL[j]))
  done
  local t=$((BUDGET - $(elapsed) - later))
  local lo=${NOMINAL[i]} hi=$((3 * NOMINAL[i]))
  [ "$t" -lt "$lo" ] && t=$lo
  [ "$t" -gt "$hi" ] && t=$hi
  local left=$((BUDGET + 15 - $(elapsed)))  # never far past the budget
  [ "$t" -gt "$left" ] && t=$left
  [ "$t" -lt 1 ] && t=1
  echo "$t"
}

# run_timed SECONDS LOG CMD...: CMD under timeout, output appended to LOG; RC holds its status (124: timed out)
run_timed() {
  local t=$1 log=$2
  shift 2
  echo "\$ $*" >>"$log"
  timeout -k 5 "$t" "$@" >>"$log" 2>&1
  RC=$?
  [ "$RC" = 137 ] && RC=124
  return 0
}

# show LOG N: the last N lines of a log, indented
show() { tail -n "$2" "$1" | sed 's/^/    /'; }

result_line() { grep -a '^RESULT: ' "$1" | tail -n 1 | sed 's/^RESULT: //'; }

# ---- steps: each sets STATUS (PASS/FAIL/SKIP) and MSG; T is its timeout ------------------------------------
step_env() {
  run_timed "$T" "$WORK/env.txt" "$PY" tools/gpu_check_util.py env "${DRYFLAG[@]}" --json "$WORK/env.json"
  cat "$WORK/env.txt" >>"$RUN_LOG"
  grep -v '^\$ ' "$WORK/env.txt" | sed 's/^/    /'
  MSG=$(result_line "$WORK/env.txt")
  if [ "$RC" = 0 ]; then STATUS=PASS; else STATUS=FAIL; MSG="${MSG:-$PY did not run} (exit $RC)"; fi
}

detect_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then return; fi
  local home
  home=$(env -u CUDA_HOME -u CUDA_PATH "$PY" -c \
    "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null | tail -n 1)
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then export CUDA_HOME=$home; return; fi
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
    return
  fi
  unset CUDA_HOME
}

step_build() {
  local parts=()
  if [ "$DRY" = 1 ]; then
    # The CPU part only: no compile (minutes on a small machine); amp_fused must import and offer the cpu
    # backend (or foreach, which the dry run's tools then stand in with), and the ptxas parser must read its
    # own sample.
    echo "dry run: not compiling; on a GPU this step runs AMP_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCH:-9.0}" \
      "AMP_FUSED_NVCC_FLAGS='-Xptxas -v' $PY setup.py build_ext --inplace" >>"$BUILD_LOG"
    run_timed "$T" "$BUILD_LOG" "$PY" tools/gpu_check_util.py backends --dry-run --json "$WORK/backends.json"
    local rc_backends=$RC
    printf '%s\n' "ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'" \
      "ptxas info    : Function properties for _Z6kernelPf" \
      "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" \
      "ptxas info    : Used 40 registers, used 1 barriers, 392 bytes cmem[0]" >"$WORK/ptxas_sample.log"
    run_timed 30 "$BUILD_LOG" "$PY" tools/ptxas_report.py "$WORK/ptxas_sample.log" --json "$WORK/ptxas.json"
    local rc_ptxas=$RC
    grep -a -E '^(amp_fused|MISSING|RESULT|import)' "$BUILD_LOG" | sed 's/^/    /'
    MSG="dry run, no compile (CPU part only): $(result_line "$BUILD_LOG"); ptxas parser sample: $(tail -n 1 "$BUILD_LOG")"
    if [ "$rc_backends" = 0 ] && [ "$rc_ptxas" = 0 ]; then STATUS=PASS; else STATUS=FAIL; fi
    return
  fi
  detect_cuda_home
  echo "CUDA_HOME=${CUDA_HOME:-not found}" >>"$BUILD_LOG"
  local t0 t1
  t0=$(date +%s)
  run_timed "$T" "$BUILD_LOG" env AMP_FUSED_CUDA=1 TORCH_CUDA_ARCH_LIST="${GPU_CHECK_ARCH:-9.0}" \
    AMP_FUSED_NVCC_FLAGS="-Xptxas -v" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace --build-temp "$WORK/build-temp"
  local rc_build=$RC
  t1=$(date +%s)
  if [ "$rc_build" != 0 ]; then
    show "$BUILD_LOG" 25
    if [ "$rc_build" = 124 ]; then MSG="build timed out after $T s"; else MSG="build failed (exit $rc_build)"; fi
    MSG="$MSG; see build.log"
    STATUS=FAIL
    return
  fi
  parts+=("built in $((t1 - t0)) s")
  "$PY" tools/ptxas_report.py "$BUILD_LOG" --json "$WORK/ptxas.json" >"$WORK/ptxas.txt" 2>&1
  local rc_ptxas=$?
  cat "$WORK/ptxas.txt" >>"$BUILD_LOG"
  sed 's/^/    /' "$WORK/ptxas.txt" | tail -n 12
  parts+=("ptxas: $(tail -n 1 "$WORK/ptxas.txt")")
  run_timed 60 "$BUILD_LOG" "$PY" tools/gpu_check_util.py backends --json "$WORK/backends.json"
  local rc_backends=$RC
  grep -a -E '^(amp_fused|MISSING|RESULT|import)' "$BUILD_LOG" | sed 's/^/    /'
  parts+=("$(result_line "$BUILD_LOG")")
  MSG=$(printf '%s; ' "${parts[@]}"); MSG=${MSG%; }
  if [ "$rc_ptxas" = 0 ] && [ "$rc_backends" = 0 ]; then STATUS=PASS; else STATUS=FAIL; fi
}

pytest_tail() { grep -a -E '(passed|failed|error|skipped|no tests ran|collected)' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'; }

# pytest_step LOG LABEL WHAT PYTEST_ARGS...: one pytest step (both test steps), setting STATUS and MSG. The dry
# run only collects (PASS when something was collected: WHAT names it); otherwise the tests run (PASS when
# pytest exits 0 and some test passed), failures and the summary line shown.
pytest_step() {
  local log=$1 label=$2 what=$3
  shift 3
  : >"$log"
  if [ "$DRY" = 1 ]; then
    run_timed "$T" "$log" "$PY" -m pytest --collect-only -q -p no:cacheprovider "$@"
    cat "$log" >>"$TESTS_LOG"
    local n; n=$("$PY" tools/gpu_check_util.py collected "$log")
    echo "    $(pytest_tail "$log")"
    if [ "$RC" = 0 ] && [ "$n" != "?" ] && [ "$n" -gt 0 ]; then
      STATUS=PASS; MSG="dry run: $n $what collected; they would run on a GPU (skipped without one)"
    else
      STATUS=FAIL; MSG="collecting the $what failed (exit $RC); see tests.log"; show "$log" 15
    fi
    return
  fi
  # -rs (pyproject's -ra too) lists every skip with its reason in the log
  run_timed "$T" "$log" "$PY" -m pytest -q -rs -p no:cacheprovider "$@"
  cat "$log" >>"$TESTS_LOG"
  grep -a -E '^(FAILED|ERROR) ' "$log" | head -n 25 | sed 's/^/    /'
  local last; last=$(pytest_tail "$log")
  echo "    $last"
  MSG="$label: ${last:-no summary line}"
  if [ "$RC" = 124 ]; then STATUS=FAIL; MSG="timed out after $T s; $MSG"
  elif [ "$RC" = 0 ] && [[ "$last" == *passed* ]]; then STATUS=PASS
  else STATUS=FAIL; [[ "$last" == *passed* ]] || MSG="$MSG (no test passed: is the GPU visible?)"; fi
}

step_cuda_tests() {
  local ignore=() workers=${GPU_CHECK_PYTEST_WORKERS:-8} xdist=() durations=()
  [ -f tests/test_triton_gpu.py ] && ignore=(--ignore=tests/test_triton_gpu.py)  # its own step
  if [ "$DRY" != 1 ]; then
    durations=(--durations=10)
    if [ "$workers" != 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then xdist=(-n "$workers"); fi
  fi
  pytest_step "$WORK/cuda_tests.log" "pytest -m cuda${xdist:+ -n $workers}" "CUDA-marked tests (-m cuda)" \
    -m cuda tests "${xdist[@]}" "${ignore[@]}" "${durations[@]}"
}

step_triton_gpu_tests() {
  if [ ! -f tests/test_triton_gpu.py ]; then
    STATUS=SKIP; MSG="tests/test_triton_gpu.py does not exist yet (tests/triton is interpreter-only: not run here)"
    return
  fi
  local durations=()
  [ "$DRY" = 1 ] || durations=(--durations=5)
  pytest_step "$WORK/triton_tests.log" "pytest tests/test_triton_gpu.py" "tests of tests/test_triton_gpu.py" \
    tests/test_triton_gpu.py "${durations[@]}"
}

# run_python_step LOGNAME SCRIPT JSON: a tool script with --budget-s a little under the timeout
run_python_step() {
  local name=$1 script=$2 json=$3
  : >"$WORK/$name.txt"
  run_timed "$T" "$WORK/$name.txt" "$PY" "$script" "${DRYFLAG[@]}" --json "$json" --budget-s $((T * 3 / 4))
  cat "$WORK/$name.txt" >>"$RUN_LOG"
  MSG=$(result_line "$WORK/$name.txt")
  if [ "$RC" = 0 ]; then STATUS=PASS
  else
    STATUS=FAIL
    [ "$RC" = 124 ] && MSG="timed out after $T s; partial results in $(basename "$json"); ${MSG}"
    [ -n "$MSG" ] || MSG="exit $RC; see run.log"
  fi
}

step_stress() {
  run_python_step stress tools/gpu_stress.py "$OUTDIR/stress.json"
  grep -a -E '^(FAIL|dry run|  [a-z]+: )' "$WORK/stress.txt" | head -n 15 | cut -c1-300 | sed 's/^/    /'
  [ "$STATUS" = PASS ] || show "$WORK/stress.txt" 12
}

step_bandwidth() {
  run_python_step bandwidth tools/gpu_bandwidth.py "$OUTDIR/bandwidth.json"
  grep -a -v -E '^(\$ |  measured |W[0-9]+ )' "$WORK/bandwidth.txt" | grep -a -v '^RESULT: ' | tail -n 60 | sed 's/^/    /'
}

step_sanitizer() {
  if [ "$DRY" = 1 ]; then
    run_timed "$T" "$SAN_LOG" "$PY" tools/gpu_sanitize_driver.py --dry-run
    STATUS=SKIP
    MSG="dry run: no compute-sanitizer on CPU tensors; its driver ran without it ($(grep -a 'DRIVER OK' "$SAN_LOG" | tail -n 1 || true))"
    [ "$RC" = 0 ] || { STATUS=FAIL; MSG="the sanitizer driver failed on CPU (exit $RC); see sanitizer.log"; show "$SAN_LOG" 15; }
    return
  fi
  detect_cuda_home
  local san
  san=$(command -v compute-sanitizer 2>/dev/null || true)
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    [ -z "$san" ] && [ -x "$candidate" ] && san=$candidate
  done
  if [ -z "$san" ]; then STATUS=SKIP; MSG="compute-sanitizer not found (PATH, \$CUDA_HOME)"; return; fi
  # memcheck gets twice the share of the others; time one tool leaves over goes to the next ones
  local tools=(memcheck racecheck initcheck) weights=(2 1 1) results=() passed=0 failed=0 skipped=0 k tool
  local step_start; step_start=$(date +%s)
  for k in 0 1 2; do
    tool=${tools[k]}
    local left=$((T - ($(date +%s) - step_start))) rest=0 j
    for ((j = k; j < 3; j++)); do rest=$((rest + weights[j])); done
    local t=$((left * weights[k] / rest))
    if [ "$t" -lt 5 ]; then results+=("$tool not run (time)"); failed=$((failed + 1)); continue; fi
    local log="$WORK/san_$tool.log"
    : >"$log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_timed "$t" "$log" "$san" --tool "$tool" --error-exitcode 86 \
      --print-limit 20 --report-api-errors no --target-processes application-only "$PY" tools/gpu_sanitize_driver.py
    { echo "===== $tool (exit $RC, timeout $t s)"; cat "$log"; } >>"$SAN_LOG"
    local errors; errors=$(grep -a -o 'ERROR SUMMARY: [0-9]* error' "$log" | tail -n 1 | grep -o '[0-9]*' || true)
    if grep -a -q -E 'Device not supported|not supported on this (platform|device)|Unable to find injection library' "$log"; then
      results+=("$tool refused the device"); skipped=$((skipped + 1))
    elif [ "$RC" = 124 ]; then
      results+=("$tool timed out after $t s"); failed=$((failed + 1))
    elif [ "$RC" = 0 ] && grep -a -q 'DRIVER OK' "$log" && [ "${errors:-0}" = 0 ]; then
      results+=("$tool 0 errors"); passed=$((passed + 1))
    else
      results+=("$tool ${errors:-?} errors (exit $RC)"); failed=$((failed + 1))
      grep -a -E '^========= (Invalid|Uninitialized|Race|Error|Program hit|  +at )' "$log" | head -n 12 | sed 's/^/    /'
    fi
    echo "    ${results[-1]}"
  done
  MSG=$(printf '%s; ' "${results[@]}"); MSG=${MSG%; }
  if [ "$failed" -gt 0 ]; then STATUS=FAIL
  elif [ "$passed" -gt 0 ]; then STATUS=PASS
  else STATUS=SKIP; MSG="compute-sanitizer refused this device: $MSG"; fi
}

# ---- run --------------------------------------------------------------------------------------------------
echo "gpu_check ($MODE): python $PY, repo $REPO, output $OUTDIR, budget $BUDGET s"
for ((i = 0; i < ${#STEPS[@]}; i++)); do
  name=${STEPS[i]}
  if ! selected "$name"; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" SKIP 0 0 "not selected (--steps $SELECTED)" >>"$WORK/steps.tsv"
    continue
  fi
  T=$(step_timeout "$i")
  echo "== $name (timeout $T s)"
  STATUS=FAIL MSG="" RC=0
  t0=$(now)
  "step_${name//-/_}"
  dt=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  MSG=$(printf '%s' "$MSG" | tr '\t\n' '  ')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$STATUS" "$dt" "$T" "$MSG" >>"$WORK/steps.tsv"
  echo "== $name: $STATUS ($dt s) $MSG"
done

TOTAL=$(elapsed)
rm -rf "$WORK/build-temp"  # the objects; the .so files are in place
"$PY" tools/gpu_check_util.py summary --steps "$WORK/steps.tsv" --work "$WORK" --out "$OUTDIR" --mode "$MODE" \
  --budget "$BUDGET" --total "$TOTAL" >>"$RUN_LOG" 2>&1 || echo "(summary.json not written: $PY failed)"

FAILS=$(awk -F'\t' '$2 == "FAIL"' "$WORK/steps.tsv" | wc -l)
{
  echo "===================================== gpu_check summary ($MODE) ====================================="
  printf '%-17s %-6s %8s  %s\n' step status seconds result
  while IFS=$'\t' read -r name status secs _timeout msg; do
    [ ${#msg} -gt 400 ] && msg="${msg:0:397}..."
    printf '%-17s %-6s %8s  %s\n' "$name" "$status" "$secs" "$msg"
  done <"$WORK/steps.tsv"
  if [ "$FAILS" -eq 0 ]; then overall=PASS; else overall="FAIL ($FAILS step(s) failed)"; fi
  echo "overall: $overall in $TOTAL s (budget $BUDGET s); logs and JSON in $OUTDIR"
} >"$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
[ "$OUTDIR" = "$WORK/out" ] || rm -rf "$WORK"  # the work folder holds only what summary.json now has
[ "$FAILS" -eq 0 ]
