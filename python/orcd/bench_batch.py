"""`orcd bench --batch 1,8,32,...`: many sequences at once through the step loop
(orcd.batch.BatchRunner), in llama-batched-bench's conventions, and the path a user
calls (Model.chat with sampling).

Per batch size B (one warm-up, then --repeat measured runs; the medians are reported
beside every run's figures): B requests, each a prompt of P random token ids followed by N
generated tokens (ignore_eos; sampled with T=0.7, top_k 40, top_p 0.95, min_p 0.05
unless --greedy), all submitted at once into B slots.
- prompt_tok_s: B*P / the time until every request has its first token (the prompts
  are evaluated one after another, each in one forward; their first tokens sampled);
- gen_tok_s: B*(N-1) / the time from then until the last request ends: the aggregate
  decode throughput with B sequences in every step;
- total_s: submit to the end.
chat: Model.chat of one conversation, N tokens at the same sampling parameters,
streamed: decode tok/s = (tokens - 1) / (last token - first token), and the time to the
first token; one warm-up, then --repeat conversations (each a new prompt), the median.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

SAMPLED = dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05)


def bench_batches(path: str, device: str, batches, n_prompt: int, n_gen: int, greedy: bool = False,
                  seed: int = 0, repeat: int = 1) -> list:
    from .batch import BatchRunner
    from .types import SamplingParams

    rng = np.random.default_rng(seed)
    out = []
    for B in batches:
        runner = BatchRunner(path, device=device, n_ctx=n_prompt + n_gen + 8, n_slots=B, max_waiting=B,
                             prefill_chunk=max(512, n_prompt))
        try:
            hi = min(runner.n_vocab, 150000)

            def once(tag):
                p = SamplingParams(max_tokens=n_gen, ignore_eos=True, **({"temperature": 0} if greedy else SAMPLED))
                t0 = time.perf_counter()
                reqs = [runner.submit(rng.integers(100, hi, size=n_prompt), p.replace(seed=seed + i))
                        for i in range(B)]
                firsts = []
                for q in reqs:
                    next(iter(q))  # blocks until its first token
                    firsts.append(time.perf_counter())
                for q in reqs:
                    q.wait()
                t_end = time.perf_counter()
                bad = [q.finish_reason for q in reqs if q.finish_reason != "length"]
                if bad:
                    raise RuntimeError(f"batch {B}: requests ended with {bad[:3]}")
                t_first = max(firsts)
                return {"prompt_s": t_first - t0, "gen_s": t_end - t_first, "total_s": t_end - t0}

            once("warm-up")
            runs = []
            for _ in range(max(1, repeat)):
                r = once("measured")
                runs.append({"prompt_tok_s": B * n_prompt / r["prompt_s"],
                             "gen_tok_s": B * (n_gen - 1) / r["gen_s"] if r["gen_s"] > 0 else None,
                             "total_s": r["total_s"]})
            med = {k: _median([x[k] for x in runs]) for k in ("prompt_tok_s", "gen_tok_s", "total_s")}
            out.append({"batch": B, "n_prompt": n_prompt, "n_gen": n_gen, **med, "runs": runs})
        finally:
            runner.close()
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def bench_chat(path: str, device: str, n_gen: int, seed: int = 0, repeat: int = 2) -> dict:
    from .model import Model

    with Model(path, device=device, n_ctx=n_gen + 256) as m:
        res = []
        for i in range(1 + max(1, repeat)):  # the first is a warm-up; each a new prompt (no cached prefill)
            msgs = [{"role": "user", "content": f"Write a long story about GPU number {i} that learns to paint."}]
            s = m.stream_chat(msgs, max_tokens=n_gen, ignore_eos=True, seed=seed + i, **SAMPLED)
            t0 = time.perf_counter()
            stamps = []
            for _ in s:
                stamps.append(time.perf_counter())
            n = s.usage.completion_tokens
            res.append({"tokens": n, "ttft_ms": 1000 * (stamps[0] - t0),
                        "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else None})
        runs = res[1:]
        med = {k: _median([r[k] for r in runs]) for k in ("tokens", "ttft_ms", "decode_tok_s")}
        return {"chat_sampled": {**med, "runs": runs}, "sampling": SAMPLED, "device": m.device}


def run(a) -> int:
    from .backend import cuda_available
    from .default_model import default_model_path

    path = a.model or default_model_path()
    device = a.device if a.device != "auto" else ("cuda" if cuda_available() else "cpu")
    batches = [int(b) for b in str(a.batch).split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch must list positive batch sizes (got {a.batch!r})")
    n_prompt = a.n_prompt if a.n_prompt else 128
    n_gen = a.n_gen if a.n_gen else 128
    res = {"model": path, "device": device, "sampling": "greedy" if a.greedy else SAMPLED,
           "repeat": max(1, a.repeat),
           "batches": bench_batches(path, device, batches, n_prompt, n_gen, a.greedy, repeat=a.repeat)}
    res.update(bench_chat(path, device, n_gen, repeat=a.repeat))
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"model {path} on {device}, pp{n_prompt} + tg{n_gen} per sequence, "
          f"{'greedy' if a.greedy else 'sampled ' + str(SAMPLED)}, median of {res['repeat']} runs")
    print(f"  {'B':>5} {'prompt tok/s':>14} {'gen tok/s':>12} {'total s':>9}")
    for r in res["batches"]:
        print(f"  {r['batch']:>5} {r['prompt_tok_s']:>14.1f} {r['gen_tok_s'] or 0:>12.1f} {r['total_s']:>9.2f}")
    c = res["chat_sampled"]
    print(f"  Model.chat sampled: {c['decode_tok_s'] or 0:.1f} tok/s decode, first token {c['ttft_ms']:.1f} ms")
    return 0
