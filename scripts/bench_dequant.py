#!/usr/bin/env python3
"""Throughput of the CPU dequantization (cpp/quants.cpp) per ggml type.

For each type, a random tensor of --n elements (random quant bytes, finite
random fp16 scales) is dequantized --repeats times through
orcd._orcd.dequantize_raw (single thread). Prints the median time and GB/s of
float32 written.

The call allocates its float32 result every time. At the default 16M elements
(64 MB out) that allocation (fresh pages from the OS, faulted in and zeroed)
can cost more than the dequantization itself; the "alloc+fill" line prints
what allocating and writing a float32 array of that size costs in NumPy as a
yardstick. With --n 1048576 the result is reused from the heap and mostly
cache-resident, which shows the kernels' own speed.

    python scripts/bench_dequant.py [--n 16777216] [--repeats 7] [--types Q4_K,Q8_0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

try:
    from orcd import _orcd
except ImportError as e:  # pragma: no cover
    sys.exit(f"bench_dequant: cannot import orcd._orcd ({e}); build/install orcd first")

# name -> (type id, block size, block bytes, byte offsets of fp16 scale fields in a block)
TYPES = {
    "F32": (0, 1, 4, []),
    "F16": (1, 1, 2, []),
    "BF16": (30, 1, 2, []),
    "Q4_0": (2, 32, 18, [0]),
    "Q4_1": (3, 32, 20, [0, 2]),
    "Q5_0": (6, 32, 22, [0]),
    "Q5_1": (7, 32, 24, [0, 2]),
    "Q8_0": (8, 32, 34, [0]),
    "Q2_K": (10, 256, 84, [80, 82]),
    "Q3_K": (11, 256, 110, [108]),
    "Q4_K": (12, 256, 144, [0, 2]),
    "Q5_K": (13, 256, 176, [0, 2]),
    "Q6_K": (14, 256, 210, [208]),
}


def make_data(name: str, n: int, rng) -> np.ndarray:
    type_id, block_size, block_bytes, f16_fields = TYPES[name]
    nb = n // block_size
    if name == "F32":
        return rng.standard_normal(n, dtype=np.float32).view(np.uint8)
    if name == "F16":
        return rng.standard_normal(n, dtype=np.float32).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
    for off in f16_fields:
        h = rng.integers(0, 0x7C00, size=nb, dtype=np.uint16) | (rng.integers(0, 2, nb, dtype=np.uint16) << 15)
        raw[:, off:off + 2] = h.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 24, help="elements per tensor (default 16M)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated type names")
    args = ap.parse_args(argv)

    names = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    for t in names:
        if t not in TYPES:
            ap.error(f"unknown type {t!r}; choose from {', '.join(TYPES)}")
    n = args.n - args.n % 256
    if n <= 0:
        ap.error("--n must be at least 256")
    rng = np.random.default_rng(0)

    print(f"dequantize_raw, {n} elements ({n * 4 / 1e6:.0f} MB float32 out), "
          f"median of {args.repeats}, single thread")
    fill = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = np.ones(n, dtype=np.float32)
        fill.append(time.perf_counter() - t0)
        del a
    t_fill = statistics.median(fill)
    print(f"alloc+fill of the output alone (np.ones): {t_fill * 1e3:.2f} ms, {n * 4 / t_fill / 1e9:.2f} GB/s")
    print("kernel: into a reused output buffer; fresh: a new array per call (allocation + page faults)")
    print(f"{'type':6s} {'in MB':>8s} {'kernel ms':>10s} {'GB/s out':>9s} {'GB/s in':>8s} {'fresh GB/s out':>15s}")
    buf = np.empty(n, dtype=np.float32)
    for name in names:
        type_id = TYPES[name][0]
        data = make_data(name, n, rng)
        _orcd.dequantize_raw(type_id, data, n, out=buf)  # warm up
        kernel, fresh = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _orcd.dequantize_raw(type_id, data, n, out=buf)
            kernel.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = _orcd.dequantize_raw(type_id, data, n)
            fresh.append(time.perf_counter() - t0)
            del out
        t, tf = statistics.median(kernel), statistics.median(fresh)
        print(f"{name:6s} {data.nbytes / 1e6:8.1f} {t * 1e3:10.2f} {n * 4 / t / 1e9:9.2f} "
              f"{data.nbytes / t / 1e9:8.2f} {n * 4 / tf / 1e9:15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
