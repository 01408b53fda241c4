"""Decode steps launched one kernel at a time (no graph, no PDL) for Nsight Compute.

    ncu --clock-control none -k regex:dec_ --launch-skip N --launch-count K ... \
        python3 scripts/gpu_ncu.py MODEL.gguf [--pos 0] [--steps 3]

Each step launches 5 kernels per layer plus the lm_head (121 for the 0.5B model);
with graphs off ncu sees every launch, so --launch-skip 121*W skips W warm-up steps.
"""
import argparse

import numpy as np

from orcd import _orcd_cuda as cu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--pos", type=int, default=0, help="tokens of prompt before the decode steps")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    e = cu.CudaEngine(a.model, a.pos + a.steps + 8, 1)
    e.set_options(graphs=False, pdl=False)
    if a.pos:
        e.forward(0, np.random.default_rng(0).integers(100, 1000, a.pos).astype(np.int32), 0)
    print(e.decode_greedy(0, 100, a.pos, a.steps))
    e.close()


if __name__ == "__main__":
    main()
