#!/usr/bin/env bash
# scripts/gpu_ab.sh MODEL.gguf [ROUNDS] - A/B of two builds in one lease: the working tree's
# (installed the usual way, /tmp/build.log) against an older one built from `old_src/`
# (made here with `mkdir old_src && git archive REV | tar -x -C old_src`, listed in
# .git/info/exclude and named in the device call's `carry`, then copied to ~/old) and
# installed into /tmp/oldsite (/tmp/oldbuild.log). Start both builds in the first call:
#   bash scripts/gpu_build.sh start; bash scripts/gpu_build.sh start ~/old /tmp/oldbuild.log /tmp/oldsite
# Then this prints tg128 / pp512 of each build, interleaved (machines differ by a few
# percent from lease to lease: compare only within one).
set -u
M=${1:?model}
ROUNDS=${2:-2}
bash "$(dirname "$0")/gpu_build.sh" wait /tmp/build.log /tmp/oldbuild.log || exit 1
cd /tmp
for r in $(seq "$ROUNDS"); do
    for v in old new; do
        if [ $v = old ]; then P=/tmp/oldsite:/tmp/site; else P=/tmp/site; fi
        echo "$v: $(PYTHONPATH=$P timeout 90 python3 -m orcd.cli bench -m "$M" --device cuda -p 512 -n 128 --repeat 3 2>&1 |
            grep -E '^ *(tg128|pp512)' | awk '{print $1, $2}' | tr '\n' ' ')"
    done
done
