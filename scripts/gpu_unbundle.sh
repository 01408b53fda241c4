#!/usr/bin/env bash
# scripts/gpu_unbundle.sh STREAM DEST:BYTES... - on the GPU machine: cut one carried byte stream
# (files concatenated here and sent in pieces under the device tool's 64 MiB a call, each piece
# appended with `cat >> STREAM`) back into its files, in order, and print their sha256.
#   bash scripts/gpu_unbundle.sh ~/bundle ~/m/qwen05.gguf:491400064 ~/w/nvidia_cublas-...whl:444289903
set -eu
src=$1; shift
off=0 total=$(stat -c %s "$src") want=0
for spec in "$@"; do want=$(( want + ${spec##*:} )); done
[ "$total" -eq "$want" ] || { echo "stream is $total bytes, the files add up to $want"; exit 1; }
for spec in "$@"; do
    dest=${spec%:*} n=${spec##*:}
    mkdir -p "$(dirname "$dest")"
    tail -c +$(( off + 1 )) "$src" | head -c "$n" > "$dest"
    off=$(( off + n ))
    echo "$(sha256sum "$dest" | cut -c1-16)  $n  $dest"
done
