#!/usr/bin/env bash
# scripts/gpu_build.sh - the background build the GPU scripts wait for (GPU machine).
#   gpu_build.sh start [SRC] [LOG] [TARGET]
#       build and install orcd from SRC (default: this tree) with the CUDA backend
#       (ORCD_CUDA=ON, no build isolation: the machine has no index) in the background,
#       LOG (default /tmp/build.log) ending with "BUILD_DONE rc"; TARGET: install into
#       that directory (pip --target, for an A/B build beside the main one). Start it in
#       the first call of a lease, while the model's chunks arrive.
#   gpu_build.sh wait [LOG ...]
#       until every LOG says BUILD_DONE (400 s at most); exits 1 with a log's tail
#       unless all say BUILD_DONE 0.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
start)
    SRC=${2:-.}
    LOG=${3:-/tmp/build.log}
    TARGET=${4:-}
    JOBS=$([ -n "$TARGET" ] && echo 8 || echo 16)
    (cd "$SRC" && setsid nohup bash -c "ORCD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$JOBS python3 -m pip install \
        --no-build-isolation --no-deps ${TARGET:+--target $TARGET} . > $LOG 2>&1; echo BUILD_DONE \$? >> $LOG" \
        > /dev/null 2>&1 &)
    ;;
wait)
    shift
    [ $# -eq 0 ] && set -- /tmp/build.log
    s=$(date +%s)
    for log in "$@"; do
        while ! grep -q BUILD_DONE "$log" 2>/dev/null; do
            sleep 2
            [ $(( $(date +%s) - s )) -gt 400 ] && break
        done
        grep -q "BUILD_DONE 0" "$log" 2>/dev/null || { echo "build failed or unfinished: $log"; tail -40 "$log"; exit 1; }
    done
    echo "build waited $(( $(date +%s) - s ))s"
    ;;
*)
    echo "usage: $0 start [SRC] [LOG] [TARGET] | wait [LOG ...]" >&2
    exit 2
    ;;
esac
