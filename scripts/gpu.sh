#!/usr/bin/env bash
# scripts/gpu.sh [OPTIONS] STEP... - everything done on the GPU machine, one driver.
#
# Steps run in the order given; each is recorded in a table printed last. Logs and JSON go
# to $OUT (the device tool brings that folder back) or /tmp/gpu.
#   build     start the background build of this tree (and of --old DIR into /tmp/oldsite);
#             start it in the first call of a lease, while the model's chunks arrive
#   wait      wait for the build(s)
#   tests     tests/test_cuda_kernels.py, tests/test_cuda_engine.py, tests/test_generate.py -k gpu
#             (the real-model tests with --model); extra pytest arguments: --pytest "ARGS"
#   sanitize  compute-sanitizer: memcheck on the kernel tests and a few engine tests,
#             racecheck on the shared-memory kernels
#   verify    orcd verify MODEL (CPU vs GPU, layer by layer)
#   bench     orcd bench --json (pp512 / tg128, --repeat N) for MODEL and the --f16 copy
#   levers    bench again with each escape hatch off (ORCD_CUDA_PDL=0, ORCD_CUDA_GRAPHS=0,
#             ORCD_CUDA_FAST_DECODE=0, ORCD_CUDA_FUSED_PROMPT=0)
#   profile   scripts/gpu_profile.py at cache lengths 64 and 512
#   ab        tg128 / pp512 of the --old build against this one, interleaved --rounds times
#             (make old_src here: `mkdir old_src && git archive REV | tar -x -C old_src`, exclude it
#             in .git/info/exclude and name it in the device call's carry)
#   ncu       scripts/gpu_ncu.sh MODEL (Nsight Compute on the decode kernels)
# Options: --model PATH, --f16 PATH (written from MODEL when missing), --old DIR, --repeat N (5),
#          --rounds N (2), --deadline S (540: steps that would start later are skipped, so the table
#          comes back inside a 10-minute call), --pytest "ARGS".
# Exit status: 0 when every step that ran passed.
set -u
source "$(dirname "$0")/gpu_lib.sh"
cd "$GPU_REPO"

MODEL= F16= OLD= REPEAT=5 ROUNDS=2 DEADLINE=540 PYARGS= STEPS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --f16) F16=$2; shift 2 ;;
        --old) OLD=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --deadline) DEADLINE=$2; shift 2 ;;
        --pytest) PYARGS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
        *) STEPS+=("$1"); shift ;;
    esac
done
D=${OUT:-/tmp/gpu}
mkdir -p "$D"
GPU_LOG=$D/log
T0=$(date +%s)
failed=0
needs_model() { [ -n "$MODEL" ] || { record "$1" skip 0 "needs --model"; return 1; }; }
late() {
    if [ $(( $(date +%s) - T0 )) -gt "$DEADLINE" ]; then record "$1" skip 0 "past the ${DEADLINE}s deadline"; return 0; fi
    return 1
}
ok_or_fail() {  # name, rc, note
    if [ "$2" -eq 0 ]; then record "$1" ok "$STEP_SECS" "$3"; else record "$1" FAIL "$STEP_SECS" "$3"; failed=1; fi
}
bench_json() {  # tag, model, extra env...
    local tag=$1 m=$2
    shift 2
    run_step "bench_$tag" 200 "$D/bench_$tag.err" bash -c "cd /tmp && env $* $PY -m orcd.cli bench -m '$m' --device cuda \
        -p 512 -n 128 --repeat $REPEAT --json > '$D/bench_$tag.json'"
    local rc=$?
    ok_or_fail "bench_$tag" $rc "$($PY - "$D/bench_$tag.json" <<'EOF' 2>&1 | cut -c1-200
import json, sys
d = json.load(open(sys.argv[1]))
med = lambda v: v["median"] if isinstance(v, dict) else v
keys = [k for k in d if k.endswith("tok_s") or k in ("load_s", "vram_bytes")]
print(" ".join(f"{k}={med(d[k]):.6g}" for k in keys if isinstance(med(d[k]), (int, float))))
EOF
)"
}

{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
} >> "$GPU_LOG"
gpu_wheels

for step in "${STEPS[@]}"; do
    late "$step" && continue
    case "$step" in
    build)
        gpu_build_start
        [ -n "$OLD" ] && gpu_build_start "$OLD" /tmp/oldbuild.log /tmp/oldsite
        record build ok 0 "started${OLD:+ (and $OLD)}" ;;
    wait)
        s=$(date +%s)
        if gpu_build_wait /tmp/build.log ${OLD:+/tmp/oldbuild.log} > "$D/wait.txt" 2>&1; then
            record wait ok $(( $(date +%s) - s )) ""
        else
            record wait FAIL $(( $(date +%s) - s )) "build failed: see wait.txt"; failed=1; cat "$D/wait.txt"; break
        fi ;;
    tests)
        [ -n "$MODEL" ] && export ORCD_TEST_MODEL=$MODEL
        run_step tests_cuda 420 "$D/tests_cuda.txt" $PY -m pytest -q -rfEs -p no:cacheprovider \
            tests/test_cuda_kernels.py tests/test_cuda_engine.py $PYARGS
        ok_or_fail tests_cuda $? "$(pytest_note "$D/tests_cuda.txt")"
        run_step tests_gen 300 "$D/tests_generate_gpu.txt" $PY -m pytest -q -rfEs -p no:cacheprovider \
            tests/test_generate.py -k gpu $PYARGS
        ok_or_fail tests_gen $? "$(pytest_note "$D/tests_generate_gpu.txt")" ;;
    sanitize)
        CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
        if [ -z "$CS" ]; then record sanitize skip 0 "compute-sanitizer not found"; continue; fi
        run_step sanitize 500 "$D/sanitize.txt" bash -c "
            echo '--- memcheck kernels'
            $CS --tool memcheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py || exit 1
            echo '--- memcheck engine'
            $CS --tool memcheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_engine.py \
                -k 'tiny_trace_matches_cpu and (Q4_K or Q5_0 or F16) or decode_batch_two or large_batch or info_and_errors or fast_decode' || exit 1
            echo '--- racecheck shared-memory kernels'
            $CS --tool racecheck --target-processes all --error-exitcode 99 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py \
                -k 'attention or attn or rmsnorm or dec_' || exit 1"
        ok_or_fail sanitize $? "$(grep -c 'ERROR SUMMARY: 0 errors' "$D/sanitize.txt") clean runs $(grep -E 'ERROR SUMMARY: [1-9]' "$D/sanitize.txt" | head -1)" ;;
    verify)
        needs_model verify || continue
        run_step verify 240 "$D/verify.txt" bash -c "cd /tmp && $PY -m orcd.cli verify '$MODEL'"
        ok_or_fail verify $? "$(tail -1 "$D/verify.txt")" ;;
    bench)
        needs_model bench || continue
        bench_json main "$MODEL"
        if [ -n "$F16" ]; then
            [ -s "$F16" ] || timeout 200 $PY -c "import sys; sys.path.insert(0, 'tests'); from tiny_models import write_f16_copy; write_f16_copy('$MODEL', '$F16')"
            [ -s "$F16" ] && bench_json f16 "$F16"
        fi ;;
    levers)
        needs_model levers || continue
        for kv in ORCD_CUDA_PDL=0 ORCD_CUDA_GRAPHS=0 ORCD_CUDA_FAST_DECODE=0 ORCD_CUDA_FUSED_PROMPT=0; do
            late "lever $kv" || bench_json "${kv%%=*}_off" "$MODEL" "$kv"
        done ;;
    profile)
        needs_model profile || continue
        run_step profile 240 "$D/profile.txt" bash -c "cd /tmp && for pos in 64 512; do \
            $PY '$GPU_REPO/scripts/gpu_profile.py' '$MODEL' --prompt \$pos --steps 16; done"
        ok_or_fail profile $? "$(tail -1 "$D/profile.txt" | cut -c1-150)" ;;
    ab)
        needs_model ab || continue
        [ -d /tmp/oldsite ] || { record ab skip 0 "no old build (--old DIR with build)"; continue; }
        : > "$D/ab.txt"
        s=$(date +%s)
        for r in $(seq "$ROUNDS"); do
            for v in old new; do
                P=/tmp/site; [ $v = old ] && P=/tmp/oldsite:/tmp/site
                echo "$v: $(cd /tmp && PYTHONPATH=$P timeout 120 $PY -m orcd.cli bench -m "$MODEL" --device cuda -p 512 -n 128 \
                    --repeat 3 2>&1 | grep -E '^ *(tg128|pp512)' | awk '{print $1, $2}' | tr '\n' ' ')" >> "$D/ab.txt"
            done
        done
        STEP_SECS=$(( $(date +%s) - s ))
        cat "$D/ab.txt" >> "$GPU_LOG"
        record ab ok "$STEP_SECS" "$(tr '\n' ';' < "$D/ab.txt" | cut -c1-300)" ;;
    ncu)
        needs_model ncu || continue
        run_step ncu 400 "$D/ncu.txt" bash scripts/gpu_ncu.sh "$MODEL"
        ok_or_fail ncu $? "" ;;
    *)
        record "$step" FAIL 0 "unknown step"; failed=1 ;;
    esac
done
echo
for f in "$D"/tests_*.txt; do
    [ -f "$f" ] && sed -n '/short test summary/,$p' "$f" | grep -E "^(FAILED|ERROR)" | cut -c1-300 | head -20
done
summary | tee "$D/summary.txt"
exit $failed
