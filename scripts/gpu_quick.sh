#!/usr/bin/env bash
# scripts/gpu_quick.sh MODEL.gguf - one device call after a (background) build: the CUDA
# kernel tests on tiny models, the decode profile, `orcd bench` (tg128/pp512) and Nsight
# Compute (scripts/gpu_ncu.sh). Waits for /tmp/build.log to say BUILD_DONE.
set -u
cd "$(dirname "$0")/.."
M=${1:?model}
bash scripts/gpu_build.sh wait || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export ORCD_TEST_MODEL=$M
[ "${QUICK_TESTS:-1}" = 1 ] && timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_cuda_engine.py ${QUICK_PYTEST:-} 2>&1 | tail -3
R=$(pwd)
[ "${QUICK_PROFILE:-1}" = 1 ] && for pos in 64 512; do (cd /tmp && timeout 120 python3 "$R/scripts/gpu_profile.py" "$M" --prompt $pos --steps 16) 2>&1 | tail -1; done
(cd /tmp && timeout 120 python3 -m orcd.cli bench -m "$M" --device cuda -p 512 -n 128 --repeat 3) 2>&1 | tail -8
# tuning knobs, each alone: QUICK_EXPLORE="ENV=V ENV=V ..."
for kv in ${QUICK_EXPLORE:-}; do
    echo "--- $kv: $(cd /tmp && timeout 60 env $kv python3 -m orcd.cli bench -m "$M" --device cuda -p 512 -n 128 --repeat 2 2>&1 | grep -E "^ *tg128" | awk '{print $1, $2}' | tr '\n' ' ')"
done
[ "${QUICK_NCU:-1}" = 1 ] && timeout 300 bash scripts/gpu_ncu.sh "$M" 5 2>&1 | tail -60
