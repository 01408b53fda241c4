#!/usr/bin/env bash
# scripts/gpu.sh [OPTIONS] STEP... - everything done on the GPU machine, one driver.
#
# Steps run in the order given; each is recorded in a table printed last. Logs and JSON go
# to $OUT (the device tool brings that folder back) or /tmp/gpu.
#   build     start the background build of this tree (and of --old DIR into /tmp/oldsite);
#             start it in the first call of a lease, while the model's chunks arrive
#   wait      wait for the build(s)
#   wheel     install the wheels in WHEEL_DIR (default ~/w: orcd's wheel built on the CPU-only machine
#             and nvidia-cublas, carried) into WHEEL_SITE (/tmp/wsite) with --no-deps, no compiler
#             involved (once a machine); the steps after it import that orcd (path and sha256 logged),
#             the same steps without it the source build's
#   tests     every tests/test_cuda_*.py and tests/test_long_context.py, tests/test_generate.py -k gpu,
#             and tests/test_server.py's haiku over HTTP against a server
#             on the GPU (the real-model tests with --model); extra pytest arguments: --pytest "ARGS"
#   sanitize  compute-sanitizer: memcheck on the kernel tests and a few engine tests,
#             racecheck on the shared-memory kernels
#   verify    orcd verify MODEL (CPU vs GPU, layer by layer)
#   verify_long  the same on a 16,384-token prompt (orcd verify --prompt-tokens 16384)
#   bench     orcd bench --json (pp512 / tg128, --repeat N) for MODEL and the --f16 copy
#   levers    bench again with each escape hatch off (ORCD_CUDA_PDL=0, ORCD_CUDA_GRAPHS=0,
#             ORCD_CUDA_FAST_DECODE=0, ORCD_CUDA_FUSED_PROMPT=0)
#   profile   scripts/gpu_profile.py at cache lengths 64 and 512
#   ab        tg128 / pp512 of the --old build against this one, interleaved --rounds times
#             (make old_src here: `mkdir old_src && git archive REV | tar -x -C old_src`, exclude it
#             in .git/info/exclude and name it in the device call's carry)
#   ab_long   the same for tg128 at depth 4,096 and 16,384 (orcd bench -p P -n 128; AB_LONG_PROMPTS: others)
#             (both: AB_ENVS="A=1;B=8 C=2" adds this build under each set of switches to every round)
#   ncu       scripts/gpu_ncu.sh MODEL (Nsight Compute on the decode kernels)
#   traces    scripts/gpu_chat_trace.py (a sampled Model.chat token: engine call, Python, kernels, GPU idle)
#             and scripts/gpu_batch_trace.py at B=8 (torch.profiler)
#   batch     orcd bench --batch 1,8,32,64,128 --json (sampled, pp128 + tg128 per sequence, and the
#             Model.chat user path); batch_sg: B=1,8 and Model.chat with ORCD_CUDA_SAMPLE_GRAPHS=0 (batch_sg.json)
#   long      orcd bench -p 4096 and -p 16384 (LONG_PROMPTS: others; -n 128: tg128 at that depth) --json
#   attn_sweep  scripts/gpu_attn_sweep.py's engine variants (ATTN_VARIANTS, ATTN_DEPTHS in the environment)
#   attn_ncu  the cluster decode attention alone at 4,096 and 16,384 positions under Nsight Compute
#   serve     orcd serve --device cuda --max-seqs 128, then orcd bench-serve at 1, 8, 32, 64, 128 clients
#   lcp_start start building llama.cpp's tools (.carry/llamacpp-src.tgz, ../shared/device/README.md; the
#             device tool puts a carried .carry in the repo root of that call only: carry it in the call
#             that copies the tree to where this script runs, or start the build from that root)
#   lcp       wait for that build, then llama-bench (pp512/tg128, pp4096, pp16384, tg128 at depth 4096
#             and 16384), llama-batched-bench (pp128/tg128 at 1,8,32,64,128) and llama-server under
#             orcd bench-serve at the same client counts as `serve`
#   lcp_batched  only the llama-batched-bench part of `lcp`; lcp_bench: only its llama-bench part
#   lcp_serve only the llama-server part of `lcp` (the build done)
#   lcp_serve_np  llama-server started once per client count N with -np N -c N*4096 (the issue's setup)
#   (serve, lcp, lcp_serve: SERVE_BENCH_ARGS in the environment goes to every bench-serve call;
#   LCP_SERVER_ARGS to llama-server's command line, e.g. "--kv-unified": in round 8 llama-server
#   reported kv_unified = 'false' and ran 1.6 ms a token for one client, 2.5x round 6's)
#   smol      SmolLM2 (~/.cache/orcd/SmolLM2-135M-Instruct.Q4_1.gguf, when there): orcd bench and,
#             with the lcp build, llama-bench on the same file
#   families  the same for SmolLM2 and Gemma 3 (~/.cache/orcd/gemma-3-270m-q4_k_m.gguf), with orcd verify
#   sampler_ncu  the device sampler's times per call and its kernels under Nsight Compute (one row)
#   vram      VRAM of an engine for 64 sequences x 4096 positions, resident fp16 copy on and off
#   passkey   scripts/passkey.py on orcd (and on llama-server when the lcp build is there)
# Options: --model PATH, --f16 PATH (written from MODEL when missing), --old DIR, --repeat N (5),
#          --rounds N (2), --deadline S (540: steps that would start later are skipped, so the table
#          comes back inside a 10-minute call), --pytest "ARGS".
# Environment: GPU_TAG names this run's archive and summary in $OUT (default results: results.tgz,
#          summary_results.txt); ORCD_CUDA_* switches pass through to every step.
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

serve_bench() {  # tag, server command: start it, bench-serve at each client count, stop it
    local tag=$1 cmd=$2 n pid s
    s=$(date +%s)
    # $! must be setsid's own pid (it becomes the server: a session and group leader), not a
    # subshell's, or the group kill below misses the server and the port stays taken
    pushd /tmp > /dev/null; setsid $cmd > "$D/serve_$tag.log" 2>&1 & pid=$!; popd > /dev/null
    until $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8090/health', timeout=2)" > /dev/null 2>&1 \
          || [ $(( $(date +%s) - s )) -gt 120 ]; do sleep 1; done
    : > "$D/serve_$tag.txt"
    for n in ${SERVE_CLIENTS:-1 8 32 64 128}; do
        (cd /tmp && timeout 120 $PY -m orcd.cli bench-serve --url http://127.0.0.1:8090 --clients $n --requests 3 \
            --max-tokens 128 --prompt-words 100 ${SERVE_BENCH_ARGS:-} --json > "$D/serve_${tag}_$n.json" \
            2>> "$D/serve_$tag.txt")
        echo "$n clients: $($PY -c "import json; d=json.load(open('$D/serve_${tag}_$n.json')); print(d['tok_per_s'], 'tok/s, ttft p50/p99', d['ttft_ms']['p50'], d['ttft_ms']['p99'], 'errors', d['errors'])" 2>&1)" >> "$D/serve_$tag.txt"
    done
    kill -TERM -- -$pid 2>/dev/null || kill -TERM $pid 2>/dev/null
    sleep 3; kill -KILL -- -$pid 2>/dev/null
    # the next server needs the port: a server that outlived its group's signals goes by name
    # (pkill -x: the binary's name, not this script's command line, which names it too)
    local bin=$(basename "${cmd%% *}")
    if [ "$bin" = llama-server ]; then pkill -KILL -x llama-server 2>/dev/null; fi
    until ! $PY -c "import socket; s=socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', 8090))" 2>/dev/null \
          || [ $(( $(date +%s) - s )) -gt 300 ]; do sleep 1; done
    STEP_SECS=$(( $(date +%s) - s ))
    cat "$D/serve_$tag.txt" >> "$GPU_LOG"
    record serve_$tag ok "$STEP_SECS" "$(tr '\n' ';' < "$D/serve_$tag.txt" | cut -c1-300)"
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
    wheel)
        # the carried wheels go to their own folder, first on PYTHONPATH for the steps after this
        # one, so a source build (build/wait, in the system site-packages) stays runnable beside it
        W=${WHEEL_DIR:-$HOME/w} WS=${WHEEL_SITE:-/tmp/wsite}
        run_step wheel 300 "$D/wheel.txt" bash -c "sha256sum $W/*.whl; ls -l $W/*.whl; [ -d $WS/orcd ] || \
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $WS $W/*.whl \
            && cd /tmp && PYTHONPATH=$WS:\$PYTHONPATH $PY -c 'import orcd, orcd.backend as b; print(\"orcd from\", orcd.__file__); \
r = b._cuda_module()[1]; print(\"CUDA:\", r or \"available\", \"cuBLAS from\", b._preload_cublas_once()); raise SystemExit(1 if r else 0)'"
        rc=$?
        export PYTHONPATH=$WS:$PYTHONPATH
        ok_or_fail wheel $rc "$(grep -E '^(orcd from|CUDA:)' "$D/wheel.txt" | tr '\n' ' ' | cut -c1-250)" ;;
    tests)
        [ -n "$MODEL" ] && export ORCD_TEST_MODEL=$MODEL
        run_step tests_cuda 420 "$D/tests_cuda.txt" $PY -m pytest -q -rfEs -p no:cacheprovider \
            $(ls tests/test_cuda_*.py tests/test_long_context.py 2>/dev/null) $PYARGS
        ok_or_fail tests_cuda $? "$(pytest_note "$D/tests_cuda.txt")"
        run_step tests_gen 300 "$D/tests_generate_gpu.txt" $PY -m pytest -q -rfEs -p no:cacheprovider \
            tests/test_generate.py -k gpu $PYARGS
        ok_or_fail tests_gen $? "$(pytest_note "$D/tests_generate_gpu.txt")"
        run_step tests_http 300 "$D/tests_http_gpu.txt" env ORCD_TEST_SERVER_DEVICE=cuda $PY -m pytest -q -rfEs -s \
            -p no:cacheprovider tests/test_server.py -k haiku $PYARGS
        ok_or_fail tests_http $? "$(pytest_note "$D/tests_http_gpu.txt")" ;;
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
    verify_long)
        needs_model verify_long || continue
        run_step verify_long 400 "$D/verify_long.txt" bash -c "cd /tmp && $PY -m orcd.cli verify '$MODEL' --prompt-tokens 16384"
        ok_or_fail verify_long $? "$(tail -1 "$D/verify_long.txt")" ;;
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
        # (PROFILE_PROMPTS: the prompt lengths, e.g. "4096 16384" for the decode step at depth)
        run_step profile 240 "$D/profile.txt" bash -c "cd /tmp && for pos in ${PROFILE_PROMPTS:-64 512}; do \
            $PY '$GPU_REPO/scripts/gpu_profile.py' '$MODEL' --prompt \$pos --steps 16; done"
        ok_or_fail profile $? "$(tail -1 "$D/profile.txt" | cut -c1-150)" ;;
    ab|ab_long)
        # the --old build against this one, interleaved --rounds times: ab with a 512-token prompt,
        # ab_long at depths 4,096 and 16,384 (each run's tok/s lines: pp, tg128, tg128 after the prompt)
        needs_model $step || continue
        [ -d /tmp/oldsite ] || { record $step skip 0 "no old build (--old DIR with build)"; continue; }
        # (AB_ENVS: ';'-separated sets of VAR=VALUE switches, each run on this build as one more
        # variant of every round, e.g. AB_ENVS="ORCD_CUDA_LM_BULK=1;ORCD_CUDA_ATTN_WARPS=8")
        PROMPTS=512; [ $step = ab_long ] && PROMPTS="${AB_LONG_PROMPTS:-4096 16384}"
        : > "$D/$step.txt"
        s=$(date +%s)
        IFS=';' read -r -a AB_SETS <<< "${AB_ENVS:-}"
        DEAD="|"  # variants whose run timed out (a hang): not run again in this step
        for r in $(seq "$ROUNDS"); do
            for v in old new "${AB_SETS[@]}"; do
                [ -n "$v" ] || continue
                case "$DEAD" in *"|$v|"*) continue ;; esac
                P=/tmp/site; [ "$v" = old ] && P=/tmp/oldsite:/tmp/site
                E=; L=$v; case $v in old|new) ;; *) E=$v; L="new[$v]" ;; esac
                for p in $PROMPTS; do
                    out=$(cd /tmp && env $E PYTHONPATH=$P timeout -k 10 "${AB_TIMEOUT:-120}" $PY -m orcd.cli bench -m "$MODEL" --device cuda \
                        -p $p -n 128 --repeat 3 2>&1)
                    rc=$?  # 124: timed out; 137: killed 10 s after that
                    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
                        echo "$L: TIMEOUT after ${AB_TIMEOUT:-120} s at -p $p (this variant's later runs skipped)" >> "$D/$step.txt"
                        DEAD="$DEAD$v|"
                        break
                    fi
                    echo "$L: $(echo "$out" | grep -E '^ *(pp|tg)[^ ]*_tok_s' | awk '{print $1, $2}' | tr '\n' ' ')" >> "$D/$step.txt"
                done
            done
        done
        STEP_SECS=$(( $(date +%s) - s ))
        cat "$D/$step.txt" >> "$GPU_LOG"
        # each variant's mean over the rounds and its change against old (scripts/ab_table.py)
        $PY scripts/ab_table.py "$D/$step.txt" > "$D/${step}_table.txt" 2>&1
        cat "$D/${step}_table.txt" >> "$GPU_LOG"
        record $step ok "$STEP_SECS" "$(grep '^tg128@' "$D/${step}_table.txt" | sed 's/^tg128@pp\([0-9]*\)_tok_s/d\1/' | awk '{print $1, $2, $3, $5}' | tr '\n' ';' | cut -c1-400)" ;;
    ncu)
        needs_model ncu || continue
        run_step ncu 400 "$D/ncu.txt" bash scripts/gpu_ncu.sh "$MODEL"
        ok_or_fail ncu $? "" ;;
    batch)
        needs_model batch || continue
        run_step batch 400 "$D/batch.err" bash -c "cd /tmp && $PY -m orcd.cli bench -m '$MODEL' --device cuda \
            --batch 1,8,32,64,128 --json > '$D/batch.json'"
        ok_or_fail batch $? "$(tail -c 300 "$D/batch.err" | tr '\n' ' ')" ;;
    batch_sg)
        needs_model batch_sg || continue
        run_step batch_sg 400 "$D/batch_sg.err" bash -c "cd /tmp && ORCD_CUDA_SAMPLE_GRAPHS=0 $PY -m orcd.cli bench \
            -m '$MODEL' --device cuda --batch 1,8 --json > '$D/batch_sg.json'"
        ok_or_fail batch_sg $? "$(tail -c 300 "$D/batch_sg.err" | tr '\n' ' ')" ;;
    traces)
        # where a sampled Model.chat token and a B=8 step go (torch.profiler: every kernel, the gaps)
        needs_model traces || continue
        run_step chat_trace 200 "$D/chat_trace.txt" $PY scripts/gpu_chat_trace.py "$MODEL" 256
        ok_or_fail chat_trace $? "$(grep -E 'us a token|GPU kernels' "$D/chat_trace.txt" | tr '\n' ';' | cut -c1-250)"
        run_step batch_trace 200 "$D/batch_trace.txt" $PY scripts/gpu_batch_trace.py "$MODEL" 8 128
        ok_or_fail batch_trace $? "$(grep -E '^B=' "$D/batch_trace.txt" | cut -c1-200)" ;;
    attn_sweep)
        # the decode step's graph time and attention marginal at depths (ATTN_DEPTHS) for the engine
        # variants of scripts/gpu_attn_sweep.py (ATTN_VARIANTS: comma-separated names; default all)
        needs_model attn_sweep || continue
        # (ATTN_KERNEL=1: the kernel-alone timings first; ATTN_TRACE: variants whose phases to trace)
        KARGS="--no-kernel"; [ -n "${ATTN_KERNEL:-}" ] && KARGS="--no-sampler --depths 1024,4096,16384"
        run_step attn_sweep 400 "$D/attn_sweep.txt" bash -c "cd /tmp && $PY '$GPU_REPO/scripts/gpu_attn_sweep.py' \
            $KARGS --model '$MODEL' --engine-depths ${ATTN_DEPTHS:-64,1024,4096,16384} --json '$D/attn_sweep.json'"
        ok_or_fail attn_sweep $? "$(tail -3 "$D/attn_sweep.txt" | cut -c1-120 | tr '\n' ';')" ;;
    attn_ncu)
        # the cluster decode attention alone (dec_attn_time: 0.5B shape, 16 blocks a cluster on tensor
        # cores) at 4,096 and 16,384 positions under Nsight Compute: duration, warp stalls, source counters
        for n in 4096 16384; do
            run_step attn_ncu_$n 200 "$D/attn_ncu_$n.txt" ncu --clock-control none -k regex:dec_attn --launch-skip 30 \
                --launch-count 1 --section SpeedOfLight --section LaunchStats --section Occupancy \
                --section WarpStateStats --section SourceCounters --section MemoryWorkloadAnalysis \
                $PY -c "from orcd import _orcd_cuda as cu; print(cu.dec_attn_time(14, 2, 64, $n, layers=24, iters=2, cluster=16, cluster_mma=True))"
            ok_or_fail attn_ncu_$n $? "$(grep -E 'Duration|Warp Cycles Per Issued' "$D/attn_ncu_$n.txt" | head -2 | tr -s ' ' | tr '\n' ';')"
        done ;;
    long)
        needs_model long || continue
        for p in ${LONG_PROMPTS:-4096 16384}; do
            # (LONG_TAG names the files of a second run, e.g. with ORCD_CUDA_ATTN_STAGE set;
            # LONG_PROMPTS other prompt lengths)
            J="$D/long_$p${LONG_TAG:-}.json"
            run_step long_$p${LONG_TAG:-} 300 "$D/long_$p${LONG_TAG:-}.err" bash -c "cd /tmp && $PY -m orcd.cli bench -m '$MODEL' --device cuda \
                -p $p -n 128 --repeat 3 --json > '$J'"
            ok_or_fail long_$p${LONG_TAG:-} $? "$($PY -c "import json,sys; d=json.load(open('$J')); print({k: (v['median'] if isinstance(v, dict) else v) for k, v in d.items() if 'tok_s' in k})" 2>&1 | cut -c1-200)"
        done ;;
    serve)
        needs_model serve || continue
        serve_bench orcd "$PY -m orcd.cli serve -m $MODEL --device cuda --max-seqs 128 --n-ctx 4096 --port 8090" ;;
    lcp_start)
        if [ -f .carry/llamacpp-src.tgz ]; then bash .carry/llamacpp-build.sh .carry/llamacpp-src.tgz > /dev/null 2>&1
            record lcp_start ok 0 "started"; else record lcp_start skip 0 "no .carry/llamacpp-src.tgz"; fi ;;
    lcp|lcp_batched|lcp_bench)
        needs_model $step || continue
        s=$(date +%s)
        while ! grep -q LCP_DONE /tmp/lcp.log 2>/dev/null && [ $(( $(date +%s) - s )) -lt 400 ]; do sleep 3; done
        grep -q "LCP_DONE 0" /tmp/lcp.log 2>/dev/null || { record $step FAIL 0 "llama.cpp build: $(tail -3 /tmp/lcp.log | tr '\n' ' ')"; failed=1; continue; }
        B=/tmp/lcp/llama.cpp/build/bin
        if [ $step != lcp_batched ]; then
            run_step lcp_bench 300 "$D/lcp_bench.txt" bash -c "$B/llama-bench -m $MODEL -p 512,4096,16384 -n 128 -r 3 -fa 1 -o md; \
                $B/llama-bench -m $MODEL -p 0 -n 128 -d 4096,16384 -r 3 -fa 1 -o md"
            ok_or_fail lcp_bench $? "$(grep -E 'pp|tg' "$D/lcp_bench.txt" | awk -F'|' '{print $(NF-2), $(NF-1)}' | tr '\n' ';' | cut -c1-250)"
        fi
        [ $step = lcp_bench ] && continue
        run_step lcp_batched 300 "$D/lcp_batched.txt" $B/llama-batched-bench -m $MODEL -ngl 99 -fa on -c 40000 \
            -npp 128 -ntg 128 -npl 1,8,32,64,128
        ok_or_fail lcp_batched $? "$(grep -E '^\|' "$D/lcp_batched.txt" | tail -5 | awk -F'|' '{print $4, $(NF-3)}' | tr '\n' ';')"
        [ $step = lcp ] && serve_bench llama "$B/llama-server -m $MODEL -ngl 99 -fa on -np 128 -c 524288 --port 8090 ${LCP_SERVER_ARGS:-}" ;;
    lcp_serve)
        needs_model lcp_serve || continue
        [ -x /tmp/lcp/llama.cpp/build/bin/llama-server ] || { record lcp_serve skip 0 "no llama-server build"; continue; }
        serve_bench llama "/tmp/lcp/llama.cpp/build/bin/llama-server -m $MODEL -ngl 99 -fa on -np 128 -c 524288 --port 8090 ${LCP_SERVER_ARGS:-}" ;;
    lcp_serve_np)
        # llama-server as the issue measured it: one server per client count with that many slots
        # (-np N, 4,096 positions each, no unified cache), then the same bench-serve
        needs_model lcp_serve_np || continue
        [ -x /tmp/lcp/llama.cpp/build/bin/llama-server ] || { record lcp_serve_np skip 0 "no llama-server build"; continue; }
        for n in 1 8 32 64 128; do
            SERVE_CLIENTS=$n serve_bench llama_np$n "/tmp/lcp/llama.cpp/build/bin/llama-server -m $MODEL -ngl 99 -fa on \
                -np $n -c $((n * 4096)) --port 8090 ${LCP_SERVER_ARGS:-}"
        done ;;
    smol|families)
        # smol: SmolLM2 alone; families: SmolLM2 and Gemma 3, each bench, verify and llama-bench
        FAM="smol:SmolLM2-135M-Instruct.Q4_1.gguf"
        [ $step = families ] && FAM="$FAM gemma3:gemma-3-270m-q4_k_m.gguf"
        for fm in $FAM; do
            tag=${fm%%:*} FM=$HOME/.cache/orcd/${fm#*:}
            [ -f "$FM" ] || { record $tag skip 0 "no $FM"; continue; }
            bench_json $tag "$FM"
            if [ $step = families ]; then
                run_step ${tag}_verify 240 "$D/${tag}_verify.txt" bash -c "cd /tmp && $PY -m orcd.cli verify '$FM'"
                ok_or_fail ${tag}_verify $? "$(tail -1 "$D/${tag}_verify.txt" | cut -c1-200)"
            fi
            if [ -x /tmp/lcp/llama.cpp/build/bin/llama-bench ]; then
                run_step ${tag}_lcp 200 "$D/${tag}_lcp.txt" /tmp/lcp/llama.cpp/build/bin/llama-bench -m "$FM" -p 512 -n 128 -r 3 -fa 1 -o md
                ok_or_fail ${tag}_lcp $? "$(grep -E 'pp|tg' "$D/${tag}_lcp.txt" | awk -F'|' '{print $(NF-2), $(NF-1)}' | tr '\n' ';' | cut -c1-200)"
            fi
        done ;;
    sampler_ncu)
        # the device sampler's kernels (slices, merge) on one row at the user path's parameters, under
        # Nsight Compute: durations, stall reasons and the hottest source lines; and their times per call
        run_step sampler_time 120 "$D/sampler_time.txt" $PY scripts/gpu_attn_sweep.py --sampler-only
        ok_or_fail sampler_time $? "$(grep -E 'rows=1 .*k40 p0.95.*split=True' "$D/sampler_time.txt" | head -2 | tr -s ' ' | tr '\n' ';')"
        run_step sampler_ncu 300 "$D/sampler_ncu.txt" ncu --clock-control none -k regex:sample_ --launch-skip 4 --launch-count 2 \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
            --section SourceCounters --section MemoryWorkloadAnalysis \
            $PY scripts/gpu_attn_sweep.py --sampler-only --sampler-iters 4 --sampler-rows 1
        ok_or_fail sampler_ncu $? "$(grep -E '^  sample_|Duration' "$D/sampler_ncu.txt" | head -4 | tr -s ' ' | tr '\n' ';' | cut -c1-250)"
        # the merge kernel's SASS with its warp-stall samples per instruction (where its serial tail goes)
        run_step sampler_sass 300 "$D/sampler_sass.txt" bash -c "ncu --clock-control none -k regex:sample_merge \
            --launch-skip 2 --launch-count 1 --section WarpStateStats --section SourceCounters --import-source yes \
            -o /tmp/sampler_merge --force-overwrite $PY scripts/gpu_attn_sweep.py --sampler-only --sampler-iters 4 \
            --sampler-rows 1 > /dev/null && ncu -i /tmp/sampler_merge.ncu-rep --page source --csv --print-source sass \
            > '$D/sampler_merge_sass.csv'"
        ok_or_fail sampler_sass $? "$(wc -l < "$D/sampler_merge_sass.csv" 2>/dev/null) SASS lines" ;;
    vram)
        needs_model vram || continue
        : > "$D/vram.txt"
        # 64 sequences x 4096 positions with and without the resident fp16 copy, then the same
        # 64 slots sharing a 1 GiB pool (kv_memory): what the VRAM is with a budget; then planned
        # as on a 4 GiB GPU (ORCD_CUDA_VRAM_LIMIT=4G): the automatic pool, and the whole 64 x 4096
        # pool (3 GiB) asked for
        for cfg in "1 0 0" "0 0 0" "1 1073741824 0" "0 1073741824 0" "1 0 4G" "1 3221225472 4G"; do
            read -r rf kvm vl <<< "$cfg"
            VL=; [ "$vl" != 0 ] && VL="ORCD_CUDA_VRAM_LIMIT=$vl"
            env $VL ORCD_CUDA_RESIDENT_F16=$rf timeout 120 $PY -c "
import orcd.backend as b
e = b.cuda_module().CudaEngine('$MODEL', 4096, 64, kv_memory=$kvm)
i = e.info()
print('resident_f16=$rf kv_memory=$kvm vram_limit=$vl', {k: i.get(k) for k in ('vram_bytes', 'vram_weights', 'vram_kv', 'vram_scratch', 'vram_resident_f16', 'kv_pool_positions')})" >> "$D/vram.txt" 2>&1
        done
        record vram ok 0 "$(tr '\n' ';' < "$D/vram.txt" | cut -c1-400)" ;;
    passkey)
        needs_model passkey || continue
        LS=/tmp/lcp/llama.cpp/build/bin/llama-server URLARG=
        if [ -x $LS ]; then
            (cd /tmp && setsid $LS -m $MODEL -ngl 99 -fa on -np 1 -c 20480 --port 8091 > "$D/passkey_llama_server.log" 2>&1 & echo $! > /tmp/pk.pid)
            s=$(date +%s)
            until $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8091/health', timeout=2)" > /dev/null 2>&1 \
                  || [ $(( $(date +%s) - s )) -gt 120 ]; do sleep 1; done
            URLARG="--url http://127.0.0.1:8091"
        fi
        run_step passkey 400 "$D/passkey.txt" bash -c "cd /tmp && $PY $GPU_REPO/scripts/passkey.py --model '$MODEL' --device cuda $URLARG"
        ok_or_fail passkey $? "$(tail -2 "$D/passkey.txt" | tr '\n' ' ' | cut -c1-250)"
        [ -f /tmp/pk.pid ] && { kill -TERM -- -$(cat /tmp/pk.pid) 2>/dev/null || kill $(cat /tmp/pk.pid) 2>/dev/null; rm -f /tmp/pk.pid; } ;;
    *)
        record "$step" FAIL 0 "unknown step"; failed=1 ;;
    esac
done
echo
for f in "$D"/tests_*.txt; do
    [ -f "$f" ] && sed -n '/short test summary/,$p' "$f" | grep -E "^(FAILED|ERROR)" | cut -c1-300 | head -20
done
TAG=${GPU_TAG:-results}
summary | tee "$D/summary_$TAG.txt"
# the device tool brings back at most 8 files: this run's files travel in one archive named by
# GPU_TAG (several runs of this script in one call each leave their own) beside its summary
if [ -n "${OUT:-}" ]; then
    tar czf "/tmp/gpu_$TAG.tgz" -C "$D" --exclude '*.tgz' --exclude 'summary_*.txt' . && mv "/tmp/gpu_$TAG.tgz" "$D/$TAG.tgz" \
        && find "$D" -mindepth 1 -maxdepth 1 ! -name '*.tgz' ! -name 'summary_*.txt' -exec rm -rf {} +
fi
exit $failed
