#!/usr/bin/env bash
# scripts/gpu_check.sh [MODEL.gguf] - on the GPU machine, in one call:
#   1. install carried wheels (.whl/*.whl, e.g. gguf) into /tmp/site (no index)
#   2. build and install orcd with the CUDA backend
#      (pip install --no-build-isolation --no-deps ., ORCD_CUDA=ON)
#   3. check orcd._orcd_cuda imports and cuda_status() == ""
#   4. run tests/test_cuda_kernels.py and tests/test_cuda_engine.py
#      (the real-model tests only when MODEL is given: ORCD_TEST_MODEL=MODEL)
#   5. with MODEL: `orcd verify MODEL` (if the CLI has it) and a short decode timing
#   6. print a short table last
# Full output goes to $OUT/log (and per-step logs in $OUT); $OUT defaults to
# /tmp/gpu_check. Extra pytest arguments: GPU_CHECK_PYTEST_ARGS.
# GPU_CHECK_SANITIZE=1 adds compute-sanitizer memcheck/racecheck runs.
# Exit status: 0 when every step that ran passed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/log"
: > "$LOG"
MODEL=${1:-}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 8)

names=()
results=()
failed=0
record() {  # name, status, seconds, note
    names+=("$1")
    results+=("$(printf '%-6s %5ss  %s' "$2" "$3" "$4")")
    [ "$2" = "FAIL" ] && failed=1
    return 0
}
run_step() {  # name, logfile, command...
    local name=$1 lf=$2
    shift 2
    local s=$(date +%s)
    echo "===== $name: $*" | tee -a "$LOG"
    "$@" > "$lf" 2>&1
    local rc=$?
    cat "$lf" >> "$LOG"
    STEP_SECS=$(( $(date +%s) - s ))
    return $rc
}
pytest_note() {  # the last summary line of a pytest log
    grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran|(passed|failed|error).* in [0-9.]+s" "$1" \
        | tail -1 | sed -e 's/=//g' -e 's/^ *//'
}

{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
    $PY --version
    $PY -c "import nanobind, numpy; print('nanobind', nanobind.__version__, 'numpy', numpy.__version__)" 2>&1
} >> "$LOG" 2>&1

# ---- 1. carried wheels
if ls .whl/*.whl > /dev/null 2>&1; then
    if run_step wheels "$OUT/wheels.log" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl; then
        record wheels ok "$STEP_SECS" "$(ls .whl | tr '\n' ' ')"
    else
        record wheels FAIL "$STEP_SECS" "see $OUT/wheels.log"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    record wheels skip 0 "no .whl/ (tests that write GGUF files need the gguf wheel)"
fi

# ---- 2. build
if run_step build "$OUT/build.log" env ORCD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" \
        $PY -m pip install --no-build-isolation --no-deps -v .; then
    record build ok "$STEP_SECS" "pip install . (ORCD_CUDA=ON)"
else
    record build FAIL "$STEP_SECS" "see $OUT/build.log"
    tail -40 "$OUT/build.log"
fi

# ---- 3. import and status (from outside the repo so the installed package is used)
if run_step import "$OUT/import.log" bash -c "cd /tmp && $PY -c '
import orcd._orcd_cuda as c
s = c.cuda_status()
print(\"cuda_status:\", repr(s))
assert s == \"\", s
print(c.device_info())
'"; then
    record import ok "$STEP_SECS" "$(grep -o "'name': '[^']*'" "$OUT/import.log" | head -1)"
else
    record import FAIL "$STEP_SECS" "$(tail -1 "$OUT/import.log")"
fi

# ---- 4. tests
KSEL=()
if [ -n "$MODEL" ]; then
    export ORCD_TEST_MODEL="$MODEL"
else
    KSEL=(-k "not real_model")
fi
for f in test_cuda_kernels test_cuda_engine; do
    run_step "$f" "$OUT/$f.log" $PY -m pytest -q -rfEs -p no:cacheprovider "tests/$f.py" "${KSEL[@]}" \
        ${GPU_CHECK_PYTEST_ARGS:-}
    rc=$?
    note=$(pytest_note "$OUT/$f.log")
    if [ $rc -eq 0 ]; then record "$f" ok "$STEP_SECS" "$note"
    else record "$f" FAIL "$STEP_SECS" "$note"; fi
done

# ---- 4b. optional: compute-sanitizer (GPU_CHECK_SANITIZE=1): memcheck on the kernel
#      tests and a few engine tests, racecheck on the shared-memory kernels
if [ -n "${GPU_CHECK_SANITIZE:-}" ]; then
    CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    if [ -z "$CS" ]; then
        record sanitize skip 0 "compute-sanitizer not found"
    else
        run_step sanitize "$OUT/sanitize.log" bash -c "
            set -o pipefail
            echo '--- memcheck kernels'
            $CS --tool memcheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py || exit 1
            echo '--- memcheck engine'
            $CS --tool memcheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_engine.py \
                -k 'tiny_trace_matches_cpu and (Q4_K or Q5_0 or F16) or decode_batch_two or large_batch or info_and_errors' || exit 1
            echo '--- racecheck attention/rmsnorm'
            $CS --tool racecheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py \
                -k 'attention or rmsnorm' || exit 1"
        rc=$?
        note="$(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize.log") clean runs; $(grep -E 'ERROR SUMMARY: [1-9]' "$OUT/sanitize.log" | head -1)"
        if [ $rc -eq 0 ]; then record sanitize ok "$STEP_SECS" "$note"
        else record sanitize FAIL "$STEP_SECS" "$note"; grep -E -A12 "=+ (Invalid|Race|Error)" "$OUT/sanitize.log" | head -40; fi
    fi
fi

# ---- 5. the real model: orcd verify and a decode timing
if [ -n "$MODEL" ]; then
    if (cd /tmp && $PY -m orcd.cli verify --help) > /dev/null 2>&1; then
        if run_step verify "$OUT/verify.log" bash -c "cd /tmp && $PY -m orcd.cli verify '$MODEL'"; then
            record verify ok "$STEP_SECS" "orcd verify"
        else
            record verify FAIL "$STEP_SECS" "$(tail -1 "$OUT/verify.log")"
        fi
    else
        record verify skip 0 "orcd verify not available"
    fi
    if run_step timing "$OUT/timing.log" bash -c "cd /tmp && $PY -c '
import time, numpy as np
import orcd._orcd_cuda as c
e = c.CudaEngine(\"$MODEL\", 1024, 1)
p = np.arange(1000, 1200, dtype=np.int32)
e.forward(0, p[:16], 0)
t = time.perf_counter(); e.forward(0, p, 0); tp = time.perf_counter() - t
pos, tok, n = len(p), 100, 200
for i in range(10): e.forward(0, np.array([tok], np.int32), pos + i)
t = time.perf_counter()
for i in range(n): e.forward(0, np.array([tok], np.int32), pos + i)
td = time.perf_counter() - t
print(f\"prompt {len(p)} tok: {len(p)/tp:.0f} tok/s; decode: {n/td:.1f} tok/s ({1e3*td/n:.3f} ms/token)\")
print(e.info())
'"; then
        record timing ok "$STEP_SECS" "$(head -1 "$OUT/timing.log")"
    else
        record timing FAIL "$STEP_SECS" "$(tail -1 "$OUT/timing.log")"
    fi
fi

# ---- 6. summary
echo
echo "== failures and skips (pytest short summaries)"
for f in test_cuda_kernels test_cuda_engine; do
    [ -f "$OUT/$f.log" ] && sed -n '/short test summary/,$p' "$OUT/$f.log" | grep -E "^(FAILED|ERROR|SKIPPED)" | cut -c1-300 | head -25
done
echo
echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
for i in "${!names[@]}"; do
    printf '%-18s %s\n' "${names[$i]}" "${results[$i]}"
done | tee -a "$LOG"
exit $failed
