#!/usr/bin/env bash
# scripts/gpu_accept.sh MODEL.gguf [F16_COPY.gguf] - the acceptance run of issue #5 on the GPU
# machine, after a (background) build that writes BUILD_DONE to /tmp/build.log:
#   GPU parity tests (tests/test_cuda_kernels.py, tests/test_cuda_engine.py with MODEL as the
#   real model, tests/test_generate.py -k gpu), `orcd bench --json` (pp512, tg128, repeat 5)
#   for MODEL and its F16 copy (written when missing), `orcd verify MODEL`, the decode profile.
# ACCEPT_TESTS=0 skips the tests; results go to $OUT (the device tool) or /tmp/accept.
set -u
cd "$(dirname "$0")/.."
M=${1:?model}
F16=${2:-}
D=${OUT:-/tmp/accept}
mkdir -p "$D"
R=$(pwd)
bash scripts/gpu_build.sh wait || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ORCD_TEST_MODEL=$M
if [ "${ACCEPT_TESTS:-1}" = 1 ]; then
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_engine.py \
        > "$D/tests_cuda.txt" 2>&1; echo "cuda tests: $(tail -1 "$D/tests_cuda.txt")"
    timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_generate.py -k gpu \
        > "$D/tests_generate_gpu.txt" 2>&1; echo "generate gpu tests: $(tail -1 "$D/tests_generate_gpu.txt")"
fi
bench() {  # tag, model
    (cd /tmp && timeout 200 python3 -m orcd.cli bench -m "$2" --device cuda -p 512 -n 128 --repeat 5 --json) \
        > "$D/bench_$1.json" 2> "$D/bench_$1.err"
    echo "bench $1: $(python3 -c "import json; d=json.load(open('$D/bench_$1.json')); print(' '.join(f'{k}={v[\"median\"]:.6g}' if isinstance(v, dict) and 'median' in v else f'{k}={v}' for k, v in d.items() if k.endswith(('tok_s', 'load_s', 'ms', 'vram', 'bytes')) or 'vram' in k))" 2>&1 | cut -c1-500)"
}
bench main "$M"
if [ -n "$F16" ]; then
    [ -s "$F16" ] || timeout 200 python3 -c "import sys; sys.path.insert(0, 'tests'); from tiny_models import write_f16_copy; write_f16_copy('$M', '$F16')"
    [ -s "$F16" ] && bench f16 "$F16"
fi
(cd /tmp && timeout 200 python3 -m orcd.cli verify "$M") > "$D/verify.txt" 2>&1; echo "verify: $(tail -1 "$D/verify.txt")"
(cd /tmp && timeout 120 python3 "$R/scripts/gpu_profile.py" "$M" --prompt 64 --steps 16) > "$D/profile.txt" 2>&1
tail -4 "$D/profile.txt"
for kv in ${ACCEPT_EXPLORE:-}; do
    echo "--- $kv: $(cd /tmp && timeout 60 env $kv python3 -m orcd.cli bench -m "$M" --device cuda -p 512 -n 128 --repeat 2 2>&1 | grep -E "^ *tg128" | awk '{print $1, $2}' | tr '\n' ' ')"
done
