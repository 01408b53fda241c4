"""Runs an installed orcd on an emulated CPU without AVX-512 and compares its tokens with the
same install on this machine (not a test: a proof step for the wheel, docs/perf_log.md run 41).

No AVX2-only machine is at hand, so QEMU's user-mode emulator plays one: `qemu-x86_64 -cpu
Haswell` runs this machine's Python with the CPUID of a Haswell (AVX2 + FMA, no AVX-512), so the
wheel's run-time dispatch sees that CPU and must pick its avx2 kernels, and any AVX-512
instruction outside the avx512 variant would die there with SIGILL. QEMU's TCG executes
AVX2 itself (since 7.2), slowly (~50x): the prompts are short.

    apt-get install qemu-user
    python scripts/emulated_cpu_check.py --python /path/to/venv/bin/python --model M.gguf [--model ...]

For each model: greedy tokens of a few prompts, on this CPU with its default kernel variant and
with each variant it has (ORCD_CPU_KERNEL), and under emulation with the default (which must be
avx2 there; `--cpu Nehalem --expect scalar`: a CPU without AVX); all must be the same tokens. Prints one JSON line per run and a summary; exit 0
when everything matched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

PROMPTS = ["def fibonacci(n):", "The capital of France is", "1, 2, 3, 5, 8,"]

CHILD = r"""
import json, sys, time
import orcd, orcd._orcd as c
model, n_tok = sys.argv[1], int(sys.argv[2])
prompts = json.loads(sys.argv[3])
t0 = time.time()
m = orcd.Model(model, device="cpu", n_ctx=256, n_threads=1)
out = [m.generate(p, max_tokens=n_tok, temperature=0, ignore_eos=True).token_ids for p in prompts]
print(json.dumps({"kernel": c.cpu_kernel(), "available": list(c.cpu_kernels()), "tokens": out,
                  "seconds": round(time.time() - t0, 1), "orcd": orcd.__file__}))
"""


def run(cmd, env_extra, model, n_tok, timeout):
    env = dict(os.environ, **env_extra)
    p = subprocess.run(cmd + ["-c", CHILD, model, str(n_tok), json.dumps(PROMPTS)], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd="/tmp")
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {p.stderr.strip()[-600:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable, help="the Python whose orcd install is checked")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--cpu", default="Haswell", help="QEMU's CPU model (no AVX-512)")
    ap.add_argument("--expect", default="avx2", help="the kernel variant the emulated CPU must get")
    ap.add_argument("--timeout", type=float, default=3000)
    a = ap.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if not qemu:
        print("qemu-x86_64 not found: apt-get install qemu-user", file=sys.stderr)
        return 2
    ok = True
    for model in a.model:
        native = run([a.python], {}, model, a.tokens, a.timeout)
        print(json.dumps({"model": os.path.basename(model), "run": "native", **native}))
        results = {"native": native}
        for v in native.get("available", []):
            r = run([a.python], {"ORCD_CPU_KERNEL": v}, model, a.tokens, a.timeout)
            print(json.dumps({"model": os.path.basename(model), "run": f"native {v}", **r}))
            results[f"native {v}"] = r
        t0 = time.time()
        emu = run([qemu, "-cpu", a.cpu, a.python], {}, model, a.tokens, a.timeout)
        print(json.dumps({"model": os.path.basename(model), "run": f"qemu -cpu {a.cpu}", **emu,
                          "wall": round(time.time() - t0, 1)}))
        results["emulated"] = emu
        want = native.get("tokens")
        same = {k: r.get("tokens") == want for k, r in results.items()}
        picked = emu.get("kernel")
        good = all(same.values()) and picked == a.expect and "avx512" not in emu.get("available", ["avx512"])
        ok &= good
        print(json.dumps({"model": os.path.basename(model), "same_tokens": same, "emulated_kernel": picked,
                          "emulated_available": emu.get("available"), "pass": good}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
