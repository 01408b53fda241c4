# scripts/gpu_lib.sh - helpers shared by the GPU machine scripts (sourced, not run).
#
#   gpu_build_start [SRC] [LOG] [TARGET]
#       build and install orcd from SRC (default: the repo) with the CUDA backend in the
#       background (ORCD_CUDA=ON, no build isolation: the machine has no package index);
#       LOG (default /tmp/build.log) ends with "BUILD_DONE rc". TARGET: install into that
#       directory (pip --target) for an A/B build beside the main one.
#   gpu_build_wait [LOG ...]
#       until every LOG says BUILD_DONE (400 s at most); returns 1 with a log's tail
#       unless all say BUILD_DONE 0.
#   gpu_wheels          carried .whl/*.whl (gguf for the tests) into /tmp/site, on PYTHONPATH
#   record NAME STATUS SECONDS NOTE / summary
#                       one row per step, printed as a table by `summary`
#   run_step NAME TIMEOUT LOGFILE CMD...
#                       runs CMD under timeout into LOGFILE (appended to $GPU_LOG), sets STEP_SECS
#   pytest_note LOG     the last pytest summary line of LOG
GPU_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

gpu_build_start() {
    local src=${1:-$GPU_REPO} log=${2:-/tmp/build.log} target=${3:-}
    local jobs
    jobs=$([ -n "$target" ] && echo 8 || nproc 2>/dev/null || echo 16)
    (cd "$src" && setsid nohup bash -c "ORCD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$jobs $PY -m pip install \
        --no-build-isolation --no-deps ${target:+--target $target} . > $log 2>&1; echo BUILD_DONE \$? >> $log" \
        > /dev/null 2>&1 &)
}

gpu_build_wait() {
    [ $# -eq 0 ] && set -- /tmp/build.log
    local s log
    s=$(date +%s)
    for log in "$@"; do
        while ! grep -q BUILD_DONE "$log" 2>/dev/null; do
            sleep 2
            [ $(( $(date +%s) - s )) -gt 400 ] && break
        done
        grep -q "BUILD_DONE 0" "$log" 2>/dev/null || { echo "build failed or unfinished: $log"; tail -40 "$log"; return 1; }
    done
    echo "build waited $(( $(date +%s) - s ))s"
}

gpu_wheels() {
    if ls "$GPU_REPO"/.whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_REPO"/.whl/*.whl > /dev/null 2>&1 || echo "pip install of .whl/ failed"
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

GPU_LOG=${GPU_LOG:-/tmp/gpu.log}
_names=()
_rows=()
record() {  # name, status, seconds, note
    _names+=("$1")
    _rows+=("$(printf '%-5s %5ss  %s' "$2" "$3" "$4")")
    return 0
}
summary() {
    local i
    echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    for i in "${!_names[@]}"; do printf '%-16s %s\n' "${_names[$i]}" "${_rows[$i]}"; done
}
run_step() {  # name, timeout_s, logfile, command...
    local name=$1 to=$2 lf=$3 s rc
    shift 3
    s=$(date +%s)
    echo "===== $name: $*" >> "$GPU_LOG"
    timeout -k 10 "$to" "$@" > "$lf" 2>&1
    rc=$?
    cat "$lf" >> "$GPU_LOG"
    STEP_SECS=$(( $(date +%s) - s ))
    [ $rc -eq 124 ] && echo "(timed out after ${to}s)" >> "$lf"
    return $rc
}
pytest_note() {
    grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)|no tests ran|(passed|failed|error).* in [0-9.]+s" "$1" \
        | tail -1 | sed -e 's/=//g' -e 's/^ *//'
}
