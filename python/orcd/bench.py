"""`orcd bench`: load time, prompt throughput (pp), decode throughput (tg),
time to first token and peak memory, llama-bench style (pp512 / tg128).

Each repeat: a fresh context; the prompt of n_prompt random token ids is
evaluated in one forward (pp = n_prompt / time); then n_gen tokens are
decoded greedily one by one (tg = n_gen / decode time, prompt excluded).
Time to first token = prompt time + one sampling step. Median and spread
over --repeat runs after one warm-up run.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import numpy as np


def _stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_engine(engine, n_vocab: int, n_prompt: int, n_gen: int, repeat: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(repeat + 1):  # run 0 is the warm-up
        prompt = rng.integers(100, min(n_vocab, 150000), size=n_prompt, dtype=np.int32)
        t0 = time.perf_counter()
        logits = engine.forward(0, prompt, 0, False)
        tok = int(np.argmax(logits))
        t1 = time.perf_counter()
        pos = n_prompt
        for _ in range(n_gen):
            logits = engine.forward(0, np.array([tok], np.int32), pos, False)
            tok = int(np.argmax(logits))
            pos += 1
        t2 = time.perf_counter()
        if r > 0:
            runs.append({"pp_s": t1 - t0, "tg_s": t2 - t1, "ttft_s": t1 - t0})
    return {
        f"pp{n_prompt}_tok_s": _stats([n_prompt / x["pp_s"] for x in runs]),
        f"tg{n_gen}_tok_s": _stats([n_gen / x["tg_s"] for x in runs]) if n_gen else None,
        "ttft_ms": _stats([1000 * x["ttft_s"] for x in runs]),
    }


def run(a) -> int:
    from . import _orcd
    from .backend import cuda_available, cuda_module
    from .default_model import default_model_path

    path = a.model or default_model_path()
    device = a.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    n_ctx = a.n_prompt + a.n_gen + 8
    t0 = time.perf_counter()
    if device == "cuda":
        engine = cuda_module().CudaEngine(path, n_ctx, 1)
    else:
        engine = _orcd.CpuEngine(path, n_ctx, 1, a.threads)
    load_s = time.perf_counter() - t0
    info = engine.info()
    res = bench_engine(engine, info["n_vocab"], a.n_prompt, a.n_gen, a.repeat)
    out = {
        "model": path,
        "device": device,
        "threads": a.threads if device == "cpu" else None,
        "n_prompt": a.n_prompt,
        "n_gen": a.n_gen,
        "repeat": a.repeat,
        "load_s": load_s,
        **res,
    }
    if device == "cuda":
        out["vram_bytes"] = info.get("vram_bytes")
        out["gpu"] = info.get("device_name")
    else:
        out["peak_rss_bytes"] = _rss_peak_bytes()
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"model {path} on {device}: load {load_s:.3f} s")
        for k in (f"pp{a.n_prompt}_tok_s", f"tg{a.n_gen}_tok_s"):
            if out.get(k):
                s = out[k]
                print(f"  {k:<16} {s['median']:>10.1f}  (min {s['min']:.1f}, max {s['max']:.1f})")
        print(f"  ttft_ms          {out['ttft_ms']['median']:>10.1f}")
        mem = out.get("vram_bytes") or out.get("peak_rss_bytes")
        if mem:
            print(f"  {'vram' if device == 'cuda' else 'peak rss'}         {mem / 1e6:>10.1f} MB")
    return 0
