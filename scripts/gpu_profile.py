"""GPU time of the fused decode step by kernel kind (CudaEngine.profile_decode),
at an empty context and after a prompt, for each model given.

    python3 scripts/gpu_profile.py MODEL.gguf [MODEL2.gguf ...] [--prompt 512] [--steps 32]

profile_decode returns the engine's DecodeProfile (cuda/cuda_api.h) as a dict: per kernel
kind (orcd._orcd_cuda.decode_kernel_kinds) the GPU time from a graph with an event after each
kernel (no PDL), so including each kernel boundary; graph_step, the same steps as the engine
runs them (graph + PDL by default); noop_step / noop_step_nopdl, graphs of empty kernels of
the same shapes (the floor that the kernel boundaries alone cost); marginal_<kind>, graph_step
minus the same graph with that kind's kernels empty (what the kind costs in the real
pipeline, PDL overlap included). Prints a table; --json for JSON.
"""
import argparse
import json

import numpy as np

from orcd import _orcd_cuda as cu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for m in a.models:
        e = cu.CudaEngine(m, a.prompt + 2 * a.steps + 8, 1)
        for pos in (0, a.prompt):
            if pos:
                e.forward(0, np.random.default_rng(0).integers(100, 1000, pos).astype(np.int32), 0)
            p = e.profile_decode(0, 100, pos, a.steps)
            rows.append({"model": m.rsplit("/", 1)[-1], "pos": pos, **p})
        e.close()
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    keys = list(cu.decode_kernel_kinds)
    tail = ["graph_step", "noop_step", "noop_step_nopdl"]
    print(f"{'model':<18} {'pos':>4} " + " ".join(f"{k[:11]:>11}" for k in keys) + f" {'sum':>7} " +
          " ".join(f"{k:>15}" for k in tail) + "  (us per step)")
    for r in rows:
        s = sum(r[k] for k in keys)
        print(f"{r['model'][:18]:<18} {r['pos']:>4} " + " ".join(f"{r[k]:>11.1f}" for k in keys) + f" {s:>7.1f} " +
              " ".join(f"{r[k]:>15.1f}" for k in tail))
        m = [r["marginal_" + k] for k in keys]
        print(f"{'  marginal':<18} {r['pos']:>4} " + " ".join(f"{v:>11.1f}" for v in m) + f" {sum(m):>7.1f}"
              + "  (graph_step minus the step with that kind's kernels empty)")


if __name__ == "__main__":
    main()
