#!/usr/bin/env bash
# scripts/gpu_bench.sh MODEL.gguf [F16.gguf] - on the GPU machine, in one call:
#   1. carried wheels (.whl/*.whl, e.g. gguf) into /tmp/site
#   2. build + install orcd with the CUDA backend (skipped when GPU_BENCH_SKIP_BUILD=1,
#      or waits for a background build: GPU_BENCH_WAIT_BUILD=LOGFILE, which ends with BUILD_DONE rc)
#   3. `orcd bench -m MODEL --device cuda --json` with every fast path on, and the same for
#      the F16 copy (second argument, made with tests/tiny_models.write_f16_copy when missing)
#   4. tests/test_cuda_kernels.py, tests/test_cuda_engine.py (the real-model tests with MODEL),
#      `orcd verify MODEL`                               (GPU_BENCH_SKIP_TESTS=1 skips 4)
#   5. the benchmark again with each fast path switched off (ORCD_CUDA_PDL=0,
#      ORCD_CUDA_GRAPHS=0, ORCD_CUDA_FAST_DECODE=0, ORCD_CUDA_FUSED_PROMPT=0): the lever
#      table of docs/perf_notes.md
#   6. a table last
# Steps that would start after GPU_BENCH_DEADLINE seconds (default 540) are skipped, so
# the table comes back inside a 10-minute call.
# Each step runs under `timeout`; logs and JSON go to $GPU_BENCH_DIR (default /tmp/gpu_bench);
# when $OUT is set (the device tool), they also come back as $OUT/gpu_bench.tgz + summary.txt.
# Knobs: GPU_BENCH_REPEAT (5), GPU_BENCH_LEVER_REPEAT (3), GPU_BENCH_P (512), GPU_BENCH_N (128),
#        GPU_BENCH_PYTEST_ARGS, GPU_BENCH_LEVERS ("pdl graphs fast_decode fused_prompt").
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RESULTS=${OUT:-}
OUT=${GPU_BENCH_DIR:-/tmp/gpu_bench}
rm -rf "$OUT"
mkdir -p "$OUT"
LOG="$OUT/log"
: > "$LOG"
MODEL=${1:-}
F16=${2:-}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 8)
REPEAT=${GPU_BENCH_REPEAT:-5}
LREPEAT=${GPU_BENCH_LEVER_REPEAT:-3}
P=${GPU_BENCH_P:-512}
N=${GPU_BENCH_N:-128}
LEVERS=${GPU_BENCH_LEVERS:-"pdl_early pdl_late pdl graphs fast_decode fused_prompt"}
DEADLINE=${GPU_BENCH_DEADLINE:-540}
T0=$(date +%s)
late() {  # name: true (and recorded as skipped) when past the deadline
    if [ $(( $(date +%s) - T0 )) -gt "$DEADLINE" ]; then record "$1" skip 0 "past the ${DEADLINE}s deadline"; return 0; fi
    return 1
}

names=()
results=()
record() {  # name, status, seconds, note
    names+=("$1")
    results+=("$(printf '%-5s %5ss  %s' "$2" "$3" "$4")")
    return 0
}
run_step() {  # name, timeout_s, logfile, command...
    local name=$1 to=$2 lf=$3
    shift 3
    local s=$(date +%s)
    echo "===== $name: $*" >> "$LOG"
    timeout -k 10 "$to" "$@" > "$lf" 2>&1
    local rc=$?
    cat "$lf" >> "$LOG"
    STEP_SECS=$(( $(date +%s) - s ))
    [ $rc -eq 124 ] && echo "(timed out after ${to}s)" >> "$lf"
    return $rc
}
pytest_note() {
    grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran|(passed|failed|error).* in [0-9.]+s" "$1" \
        | tail -1 | sed -e 's/=//g' -e 's/^ *//'
}

{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
    $PY --version
} >> "$LOG" 2>&1

# ---- 1. wheels
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >> "$LOG" 2>&1 && record wheels ok 0 "$(ls .whl | tr '\n' ' ')" || record wheels FAIL 0 "pip install of .whl/"
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# ---- 2. build
if [ -n "${GPU_BENCH_WAIT_BUILD:-}" ]; then
    s=$(date +%s)
    while ! grep -q BUILD_DONE "$GPU_BENCH_WAIT_BUILD" 2>/dev/null && [ $(( $(date +%s) - s )) -lt 400 ]; do sleep 2; done
    cat "$GPU_BENCH_WAIT_BUILD" >> "$LOG"
    if grep -q "BUILD_DONE 0" "$GPU_BENCH_WAIT_BUILD"; then record build ok $(( $(date +%s) - s )) "background build"
    else record build FAIL $(( $(date +%s) - s )) "background build: $(tail -3 "$GPU_BENCH_WAIT_BUILD" | tr '\n' ' ')"; fi
elif [ -z "${GPU_BENCH_SKIP_BUILD:-}" ]; then
    if run_step build 500 "$OUT/build.log" env ORCD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$NPROC" \
            $PY -m pip install --no-build-isolation --no-deps -v .; then
        record build ok "$STEP_SECS" "pip install . (ORCD_CUDA=ON)"
    else
        record build FAIL "$STEP_SECS" "see build.log"
        tail -30 "$OUT/build.log"
    fi
fi
(cd /tmp && $PY -c "import orcd._orcd_cuda as c; s = c.cuda_status(); assert s == '', s; print(c.device_info())") \
    >> "$LOG" 2>&1 && record import ok 0 "orcd._orcd_cuda" || record import FAIL 0 "see log"

# ---- 3. benches, everything on
bench() {  # tag, model, repeat, env...
    local tag=$1 m=$2 r=$3
    shift 3
    late "b:$tag" && return 0
    local s=$(date +%s)
    echo "===== bench $tag: $* orcd bench -m $m -p $P -n $N --repeat $r" >> "$LOG"
    timeout -k 10 120 env "$@" bash -c "cd /tmp && $PY -m orcd.cli bench -m '$m' --device cuda -p $P -n $N --repeat $r --json" \
        > "$OUT/bench_$tag.json" 2> "$OUT/bench_$tag.err"
    local rc=$?
    cat "$OUT/bench_$tag.json" "$OUT/bench_$tag.err" >> "$LOG"
    if [ $rc -eq 0 ]; then record "b:$tag" ok $(( $(date +%s) - s )) ""
    else record "b:$tag" FAIL $(( $(date +%s) - s )) "rc $rc: $(tail -2 "$OUT/bench_$tag.err" | tr '\n' ' ' | cut -c1-160)"; fi
}
if [ -n "$MODEL" ]; then
    bench q4 "$MODEL" "$REPEAT"
    if [ -n "$F16" ]; then
        if [ ! -s "$F16" ]; then
            if run_step f16copy 150 "$OUT/f16copy.log" $PY -c \
                    "import sys; sys.path.insert(0, 'tests'); from tiny_models import write_f16_copy; write_f16_copy('$MODEL', '$F16')"; then
                record f16copy ok "$STEP_SECS" "$F16"
            else
                record f16copy FAIL "$STEP_SECS" "$(tail -1 "$OUT/f16copy.log")"
            fi
        fi
        [ -s "$F16" ] && bench f16 "$F16" "$REPEAT"
    fi
fi

# ---- 3b. decode step by kernel kind
if [ -n "$MODEL" ] && ! late profile; then
    pm=("$MODEL")
    [ -s "$F16" ] && pm+=("$F16")
    if run_step profile 120 "$OUT/profile.txt" bash -c "cd /tmp && $PY '$ROOT/scripts/gpu_profile.py' ${pm[*]}"; then
        record profile ok "$STEP_SECS" "profile.txt"
    else
        record profile FAIL "$STEP_SECS" "$(tail -1 "$OUT/profile.txt")"
    fi
    # tuning knobs, each alone (GPU_BENCH_EXPLORE="ENV=V ENV=V ..."): the same profile at pos 0
    for kv in ${GPU_BENCH_EXPLORE:-}; do
        late "explore $kv" && break
        echo "--- $kv" >> "$OUT/explore.txt"
        timeout -k 5 60 env "$kv" bash -c "cd /tmp && $PY '$ROOT/scripts/gpu_profile.py' '$MODEL' --prompt 512 --steps 16" \
            >> "$OUT/explore.txt" 2>&1
    done
fi

# ---- 4. tests
if [ -z "${GPU_BENCH_SKIP_TESTS:-}" ]; then
    KSEL=()
    if [ -n "$MODEL" ]; then export ORCD_TEST_MODEL="$MODEL"; else KSEL=(-k "not real_model"); fi
    for f in test_cuda_kernels test_cuda_engine; do
        late "$f" && continue
        run_step "$f" 300 "$OUT/$f.log" $PY -m pytest -q -rfEsw -p no:cacheprovider "tests/$f.py" "${KSEL[@]}" \
            ${GPU_BENCH_PYTEST_ARGS:-}
        rc=$?
        if [ $rc -eq 0 ]; then record "$f" ok "$STEP_SECS" "$(pytest_note "$OUT/$f.log")"
        else record "$f" FAIL "$STEP_SECS" "rc $rc: $(pytest_note "$OUT/$f.log")"; fi
    done
    if [ -n "$MODEL" ] && ! late verify; then
        if run_step verify 120 "$OUT/verify.log" bash -c "cd /tmp && $PY -m orcd.cli verify '$MODEL'"; then
            record verify ok "$STEP_SECS" "$(tail -1 "$OUT/verify.log" | cut -c1-100)"
        else
            record verify FAIL "$STEP_SECS" "$(tail -1 "$OUT/verify.log" | cut -c1-100)"
        fi
    fi
fi

# ---- 5. levers: each fast path off in turn
if [ -n "$MODEL" ]; then
    for lv in $LEVERS; do
        case $lv in
            pdl_early) bench q4-pdl-early "$MODEL" "$LREPEAT" ORCD_CUDA_PDL_TRIGGER=0 ;;
            pdl_late) bench q4-pdl-late "$MODEL" "$LREPEAT" ORCD_CUDA_PDL_TRIGGER=2 ;;
            pdl) bench q4-no-pdl "$MODEL" "$LREPEAT" ORCD_CUDA_PDL=0 ;;
            graphs) bench q4-no-graphs "$MODEL" "$LREPEAT" ORCD_CUDA_GRAPHS=0 ;;
            fast_decode) bench q4-no-fast-decode "$MODEL" "$LREPEAT" ORCD_CUDA_FAST_DECODE=0 ;;
            fused_prompt) bench q4-no-fused-prompt "$MODEL" "$LREPEAT" ORCD_CUDA_FUSED_PROMPT=0 ;;
        esac
    done
fi

# ---- 6. summary
{
echo
echo "== failures (pytest short summaries)"
for f in test_cuda_kernels test_cuda_engine; do
    [ -f "$OUT/$f.log" ] && sed -n '/short test summary/,$p' "$OUT/$f.log" | grep -E "^(FAILED|ERROR)" | cut -c1-250 | head -20
done
echo
$PY - "$OUT" "$P" "$N" <<'EOF'
import json, os, sys
out, p, n = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for f in sorted(os.listdir(out)):
    if not (f.startswith("bench_") and f.endswith(".json")):
        continue
    try:
        d = json.load(open(os.path.join(out, f)))
    except Exception:
        continue
    g = lambda k: (d.get(k) or {}).get("median")
    paths = d.get("paths") or {}
    rows.append((f[6:-5], g(f"pp{p}_tok_s"), g(f"tg{n}_tok_s"), g(f"tg{n}@pp{p}_tok_s"), g("ttft_ms"), d.get("load_s"),
                 g("load_warm_s"), d.get("vram_bytes"), d.get("vram_peak_bytes"),
                 "".join(c for k, c in (("fast_decode", "D"), ("graphs", "G"), ("pdl", "P"), ("fused_prompt", "F"))
                         if paths.get(k))))
fmt = "{:<20} {:>9} {:>9} {:>11} {:>8} {:>7} {:>7} {:>8} {:>8} {:>5}"
print(fmt.format("variant", f"pp{p}", f"tg{n}", f"tg{n}@pp{p}", "ttft_ms", "load_s", "warm_s", "vram_MB", "peak_MB", "paths"))
f = lambda v, k=1: "-" if v is None else (f"{v:.0f}" if k else f"{v:.2f}")
for r in rows:
    print(fmt.format(r[0], f(r[1]), f(r[2]), f(r[3]), f(r[4], 0), f(r[5], 0), f(r[6], 0),
                     f(r[7] / 1e6 if r[7] else None), f(r[8] / 1e6 if r[8] else None), r[9]))
EOF
echo
[ -f "$OUT/profile.txt" ] && cat "$OUT/profile.txt"
[ -f "$OUT/explore.txt" ] && grep -v "^model" "$OUT/explore.txt"
echo
echo "== gpu_bench summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
for i in "${!names[@]}"; do printf '%-22s %s\n' "${names[$i]}" "${results[$i]}"; done
} 2>&1 | tee -a "$LOG" | tee "$OUT/summary.txt"
if [ -n "$RESULTS" ]; then
    cp "$OUT/summary.txt" "$RESULTS/" 2>/dev/null
    tar czf "$RESULTS/gpu_bench.tgz" -C "$OUT" . 2>/dev/null
fi
