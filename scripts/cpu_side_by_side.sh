#!/usr/bin/env bash
# scripts/cpu_side_by_side.sh MODEL LLAMA_BENCH [ROUNDS] [ORCD_KERNEL] - orcd's CPU engine against
# llama.cpp's llama-bench on the same file and machine, 2 threads, alternated ROUNDS times (default 5):
# this kind of VM drifts by up to a third within minutes, so only alternated runs compare.
# Each round: `orcd bench -p 256 -n 64 --repeat 3` then `llama-bench -p 256 -n 64 -t 2 -r 3`.
# ORCD_KERNEL (e.g. avx2) pins orcd's CPU kernel variant; build llama.cpp to match (for AVX2:
# -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF). Prints one line a round and the medians.
set -u
M=$1 LB=$2 ROUNDS=${3:-5} K=${4:-}
PY=${PYTHON:-python3}
o_pp=() o_tg=() l_pp=() l_tg=()
for r in $(seq "$ROUNDS"); do
    oj=$(cd /tmp && env ${K:+ORCD_CPU_KERNEL=$K} $PY -m orcd.cli bench -m "$M" --device cpu -p 256 -n 64 --repeat 3 \
        --threads 2 --json 2>/dev/null)
    read -r opp otg okern <<< "$($PY -c "import json,sys; d=json.loads(sys.argv[1]); m=lambda v: v['median'] if isinstance(v, dict) else v; print(round(m(d['pp256_tok_s']),1), round(m(d['tg64_tok_s']),1), d.get('cpu_kernel', '?'))" "$oj")"
    lo=$("$LB" -m "$M" -p 256 -n 64 -t 2 -r 3 -o csv 2>/dev/null)
    lpp=$(echo "$lo" | awk -F, '/"256","0"/ {gsub(/"/,"",$0); print $0}' | awk -F, '{print $(NF-1)}' | head -1)
    ltg=$(echo "$lo" | awk -F, '/"0","64"/ {gsub(/"/,"",$0); print $0}' | awk -F, '{print $(NF-1)}' | head -1)
    printf 'round %d: orcd (%s) pp256 %s tg64 %s | llama.cpp pp256 %.1f tg64 %.1f\n' "$r" "$okern" "$opp" "$otg" "$lpp" "$ltg"
    o_pp+=("$opp") o_tg+=("$otg") l_pp+=("$lpp") l_tg+=("$ltg")
done
$PY - "${o_pp[*]}" "${o_tg[*]}" "${l_pp[*]}" "${l_tg[*]}" <<'PYEOF'
import statistics, sys
op, ot, lp, lt = ([float(x) for x in a.split()] for a in sys.argv[1:5])
med = statistics.median
print(f"median: orcd pp256 {med(op):.1f} tg64 {med(ot):.1f} | llama.cpp pp256 {med(lp):.1f} tg64 {med(lt):.1f}"
      f" | ratio pp {med(op) / med(lp):.2f}x tg {med(ot) / med(lt):.2f}x;"
      f" per-round tg ratios {[round(a / b, 2) for a, b in zip(ot, lt)]}")
PYEOF
