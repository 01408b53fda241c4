#!/usr/bin/env bash
# scripts/gpu_ncu.sh MODEL.gguf [LAYER] - Nsight Compute on the fused decode step (GPU machine).
#   1. every decode kernel of one step (pos 0, third step), duration only: ncu_durations.txt
#   2. the five kernels of layer LAYER (default 5) and the lm_head with the
#      speed-of-light, occupancy, warp-state and source-counter sections: ncu_details.txt
#   3. their stall reasons (cycles per issued instruction by reason): ncu_stalls.txt
# Kernels run one at a time under ncu (no graph, no PDL), so durations are each
# kernel alone: launch to completion, weights from HBM (ncu flushes the caches).
set -u
source "$(dirname "$0")/gpu_lib.sh"
cd "$GPU_REPO"
gpu_build_wait || exit 1
M=${1:?model}
L=${2:-5}
D=${OUT:-/tmp/ncu}
mkdir -p "$D"
NL=$($PY -c "from orcd import GGUFFile; print(GGUFFile('$M').metadata['qwen2.block_count'])")
K=$((5 * NL + 1))
NCU="ncu --clock-control none -k regex:dec_"
$NCU --metrics gpu__time_duration.sum --csv --launch-skip $((2 * K)) --launch-count $K \
    $PY scripts/gpu_ncu.py "$M" --steps 3 > "$D/ncu_durations.csv" 2> "$D/ncu_durations.err"
$PY - "$D/ncu_durations.csv" "$NL" > "$D/ncu_durations.txt" <<'PYEOF'
import csv, sys, statistics
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr, rows = rows[0], rows[1:]
iname, ival = hdr.index("Kernel Name"), hdr.index("Metric Value")
vals = [float(r[ival].replace(",", "")) for r in rows]
unit = rows[0][hdr.index("Metric Unit")]
kinds = ["qkv", "attention", "attn_output", "gate_up", "down"]
by = {k: [] for k in kinds + ["lm_head"]}
for i, v in enumerate(vals):
    by["lm_head" if i == len(vals) - 1 else kinds[i % 5]].append(v)
print(f"{len(vals)} kernels, unit {unit}")
for k, v in by.items():
    if v: print(f"{k:12s} n={len(v):3d} median={statistics.median(v):9.0f} min={min(v):9.0f} max={max(v):9.0f} sum={sum(v):10.0f}")
print(f"total {sum(vals):.0f}")
PYEOF
cat "$D/ncu_durations.txt"
SEC="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis"
$NCU $SEC --launch-skip $((2 * K + 5 * L)) --launch-count 5 $PY scripts/gpu_ncu.py "$M" --steps 3 > "$D/ncu_details.txt" 2>&1
$NCU $SEC --launch-skip $((3 * K - 1)) --launch-count 1 $PY scripts/gpu_ncu.py "$M" --steps 4 > "$D/ncu_lm.txt" 2>&1
# 3. stall reasons of the same five kernels (raw warp-state metrics: cycles per issued instruction by reason)
$NCU --section WarpStateStats --page raw --launch-skip $((2 * K + 5 * L)) --launch-count 5 $PY scripts/gpu_ncu.py "$M" --steps 3 \
    > "$D/ncu_stalls_raw.txt" 2>&1
$PY - "$D/ncu_stalls_raw.txt" > "$D/ncu_stalls.txt" <<'PYEOF'
import re, sys
kern, out = None, []
for line in open(sys.argv[1]):
    m = re.search(r"::(dec_\w+)[<(]", line)
    if m:
        kern = m.group(1); out.append(f"== {kern}"); continue
    m = re.match(r"\s+smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio\s+\S*\s+([\d.,]+)", line)
    if m and float(m.group(2).replace(",", "")) >= 0.2:
        out.append(f"   {m.group(1):28s} {m.group(2)}")
print("\n".join(out))
PYEOF
cat "$D/ncu_stalls.txt"
wc -l "$D"/*.txt
