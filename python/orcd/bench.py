"""`orcd bench`: load time, prompt throughput (pp), decode throughput (tg),
time to first token and peak memory, with llama-bench's conventions.

- load: file -> engine ready. `load_s` is the first load of the process (for
  CUDA it includes creating the GPU context); `load_warm_s` reloads the same
  file twice more (context up, file in the page cache).
- pp{P}: a prompt of P random token ids evaluated in one forward from an empty
  context (llama-bench's pp512); tok/s = P / time. The time includes copying
  the last token's logits to the host.
- tg{N}: N tokens generated one at a time from an empty context, greedily
  (llama-bench's tg128 decodes from position 0 and samples nothing); only the
  decode steps are timed. With the CUDA engine the whole loop runs on the GPU
  (`decode_greedy`: argmax on the device, only token ids reach the host);
  engines without it use forward + NumPy argmax per token (`tg_method`).
- tg{N}@pp{P}: the same N steps right after the P-token prompt (a realistic
  generation: attention over P..P+N cached positions).
- ttft: prompt evaluation + the first token's argmax, in ms.
- memory: CUDA: the engine's own allocation (`vram_bytes`: weights, KV cache,
  scratch) and the device memory the process took beyond that while running
  (`vram_peak_bytes`: free memory before loading minus the least seen);
  CPU: peak RSS.
- threads (CPU): the thread count the engine runs with (`--threads 0` is one per
  core); `threads_requested` is --threads as given. Progress (phase and run) goes
  to stderr.

Every measurement is repeated --repeat times after one warm-up run of each
kind; the JSON holds median, min, max, stdev and the values.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def _stats(xs):
    xs = [float(x) for x in xs]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "values": xs}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Runner:
    """The engine calls the benchmark needs, for the CUDA and the CPU engine."""

    def __init__(self, engine, n_vocab: int, seed: int = 0):
        self.e = engine
        self.n_vocab = n_vocab
        self.rng = np.random.default_rng(seed)
        self.greedy = hasattr(engine, "decode_greedy")

    def tokens(self, n: int) -> np.ndarray:
        lo = 100 if self.n_vocab > 200 else 0
        return self.rng.integers(lo, min(self.n_vocab, 150000), size=n, dtype=np.int32)

    def prompt(self, toks: np.ndarray) -> tuple:
        """(seconds, first token) for the prompt from position 0."""
        t0 = time.perf_counter()
        logits = self.e.forward(0, toks, 0, False)
        tok = int(np.argmax(logits))
        return time.perf_counter() - t0, tok

    def generate(self, first: int, pos: int, n: int) -> float:
        """Seconds for n greedy single-token steps starting at `pos`."""
        if self.greedy:
            t0 = time.perf_counter()
            self.e.decode_greedy(0, first, pos, n)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = first
        for i in range(n):
            logits = self.e.forward(0, np.array([tok], np.int32), pos + i, False)
            tok = int(np.argmax(logits))
        return time.perf_counter() - t0


def bench_engine(engine, n_vocab: int, n_prompt: int, n_gen: int, repeat: int, seed: int = 0,
                 on_step=None, progress=None) -> dict:
    """pp / tg / tg-after-pp / ttft statistics of one engine (see the module doc).
    progress(text): told which phase of which run starts (None: silent)."""
    r = _Runner(engine, n_vocab, seed)
    say = progress or (lambda text: None)
    pp_s, ttft_s, tg_s, tga_s = [], [], [], []
    for it in range(repeat + 1):  # run 0 is the warm-up
        run = f"run {it}/{repeat}" if it else "warm-up"
        first = None
        if n_prompt > 0:
            say(f"{run}: pp{n_prompt}")
            dt, first = r.prompt(r.tokens(n_prompt))
            if it:
                pp_s.append(dt)
                ttft_s.append(dt)
            if n_gen > 0:
                say(f"{run}: tg{n_gen}@pp{n_prompt}")
                dt = r.generate(first, n_prompt, n_gen)
                if it:
                    tga_s.append(dt)
        if n_gen > 0:
            say(f"{run}: tg{n_gen}")
            dt = r.generate(int(r.tokens(1)[0]), 0, n_gen)
            if it:
                tg_s.append(dt)
        if on_step:
            on_step()
    out = {"tg_method": "decode_greedy" if r.greedy else "forward_loop"}
    out[f"pp{n_prompt}_tok_s"] = _stats([n_prompt / x for x in pp_s]) if pp_s else None
    out[f"tg{n_gen}_tok_s"] = _stats([n_gen / x for x in tg_s]) if tg_s else None
    out[f"tg{n_gen}@pp{n_prompt}_tok_s"] = _stats([n_gen / x for x in tga_s]) if tga_s else None
    out["ttft_ms"] = _stats([1000 * x for x in ttft_s]) if ttft_s else None
    return out


def _load(device: str, path: str, n_ctx: int, threads: int):
    from . import _orcd

    if device == "cuda":
        from .backend import cuda_module
        return cuda_module().CudaEngine(path, n_ctx, 1)
    return _orcd.CpuEngine(path, n_ctx, 1, threads)


class _Progress:
    """Which phase runs now, on stderr: one line rewritten in place on a terminal, a line per
    phase otherwise (so a log shows where a slow run was)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, text: str) -> None:
        self.stream.write(f"\r\033[Korcd bench: {text}" if self.tty else f"orcd bench: {text}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def cpu_threads(requested: int) -> int:
    """The CPU engine's thread count for n_threads=requested, as cpp/threadpool.cpp sets it:
    0 is one per core this process may run on; at most 4 per core (and at least 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    cores = max(1, cores)
    n = requested if requested > 0 else cores
    return max(1, min(n, max(4, 4 * min(cores, 16383))))


def run(a) -> int:
    from .backend import cuda_available
    from .default_model import default_model_path

    path = a.model or default_model_path()
    device = a.device
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    n_prompt, n_gen, repeat = max(0, a.n_prompt), max(0, a.n_gen), max(1, a.repeat)
    n_ctx = max(n_prompt, 1) + n_gen + 8

    free_before = None
    cu = None
    if device == "cuda":
        from .backend import cuda_module
        cu = cuda_module()
        free_before = cu.device_info()["free_memory"]  # creates the context first
    progress = _Progress()
    t0 = time.perf_counter()
    engine = _load(device, path, n_ctx, a.threads)
    load_s = time.perf_counter() - t0
    # after the load: a file that cannot be loaded stays a one-line error
    progress(f"loaded {os.path.basename(path)} on {device} in {load_s:.2f} s")
    info = engine.info()
    free_min = [None]

    def sample_free():
        if cu is not None:
            f = cu.device_info()["free_memory"]
            free_min[0] = f if free_min[0] is None else min(free_min[0], f)

    sample_free()
    res = bench_engine(engine, info["n_vocab"], n_prompt, n_gen, repeat, on_step=sample_free, progress=progress)

    warm = []
    engine.close()
    for i in range(2):
        progress(f"warm load {i + 1}/2")
        t0 = time.perf_counter()
        e2 = _load(device, path, n_ctx, a.threads)
        warm.append(time.perf_counter() - t0)
        e2.close()
    progress.done()

    out = {
        "model": path,
        "model_bytes": os.path.getsize(path),
        "device": device,
        # the engine's own count when it reports one, else what the thread pool makes of --threads
        "threads": (info.get("n_threads") or cpu_threads(a.threads)) if device == "cpu" else None,
        "threads_requested": a.threads if device == "cpu" else None,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repeat": repeat,
        "n_ctx": n_ctx,
        "load_s": load_s,
        "load_warm_s": _stats(warm),
        **res,
    }
    if device == "cuda":
        out["gpu"] = info.get("device_name") or info.get("device")
        out["vram_bytes"] = info.get("vram_bytes")
        out["vram_weights_bytes"] = info.get("vram_weights")
        out["vram_peak_bytes"] = (free_before - free_min[0]) if free_min[0] is not None else None
        out["paths"] = info.get("paths")
    else:
        out["cpu_kernel"] = info.get("cpu_kernel")  # the matmul variant: scalar, avx2 or avx512
        out["peak_rss_bytes"] = _rss_peak_bytes()
        if info.get("cpu_kernel") is not None:
            out["cpu_kernel"] = info.get("cpu_kernel")
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    where = f" ({out['gpu']})" if out.get("gpu") else ""
    if device == "cpu":
        where = f" ({out['threads']} threads" + (f", {out['cpu_kernel']}" if out.get("cpu_kernel") else "") + ")"
    print(f"model {path} on {device}{where}"
          f": load {load_s:.3f} s (warm {out['load_warm_s']['median']:.3f} s)")
    for k in (f"pp{n_prompt}_tok_s", f"tg{n_gen}_tok_s", f"tg{n_gen}@pp{n_prompt}_tok_s"):
        s = out.get(k)
        if s:
            print(f"  {k:<22} {s['median']:>10.1f}  (min {s['min']:.1f}, max {s['max']:.1f}, n {s['n']})")
    if out.get("ttft_ms"):
        print(f"  {'ttft_ms':<22} {out['ttft_ms']['median']:>10.2f}")
    if device == "cuda":
        print(f"  {'vram (engine)':<22} {out['vram_bytes'] / 1e6:>10.1f} MB")
        if out.get("vram_peak_bytes") is not None:
            print(f"  {'vram (process peak)':<22} {out['vram_peak_bytes'] / 1e6:>10.1f} MB")
        if out.get("paths"):
            print(f"  paths: {out['paths']}")
    else:
        print(f"  {'cpu kernels':<22} {out['cpu_kernel']:>10}")
        print(f"  {'peak rss':<22} {out['peak_rss_bytes'] / 1e6:>10.1f} MB")
    return 0
