"""Profiling tool (not a test): the per-token Python cost of Model.stream_chat's device-block
path, with an engine whose decode_sample_steps hands its block back at once (the tokens of a
fixed text), so what is measured is what the host adds per token (docs/perf_log.md run 40).

    python scripts/chat_host_overhead.py MODEL.gguf [prof]

MODEL gives the tokenizer, the chat template and the CPU engine the prompt runs on; `prof`
adds a cProfile of one 2,048-token stream."""
import sys, time, cProfile, pstats
import numpy as np
import orcd
from orcd import _orcd

class Instant:
    def __init__(self, eng, toks):
        self._eng, self._toks, self._i = eng, toks, 0
    def __getattr__(self, n):
        return getattr(self._eng, n)
    def decode_sample_steps(self, slot, token, pos, n_steps, params, rng_state):
        out = [self._toks[(self._i + k) % len(self._toks)] for k in range(n_steps)]
        self._i += n_steps
        return np.asarray(out, np.int32), rng_state + 1

path = sys.argv[1]
m = orcd.Model(path, device="cpu", n_ctx=4096)
text_ids = m.tokenize("def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[0]\n" * 20)
m._engine = Instant(m._engine, [int(t) for t in text_ids])
m.device = "cuda"
msgs = [{"role": "user", "content": "Write a long story."}]
def run(n):
    s = m.stream_chat(msgs, max_tokens=n, ignore_eos=True, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=1)
    t0 = time.perf_counter(); k = 0; first = None
    for piece in s:
        if first is None: first = time.perf_counter()
        k += 1
    t1 = time.perf_counter()
    return (t1 - first) / max(1, s.usage.completion_tokens - 1) * 1e6, s.usage.completion_tokens
for _ in range(3): run(512)
print("us per token after the first:", [round(run(1024)[0], 2) for _ in range(5)])
if len(sys.argv) > 2:
    pr = cProfile.Profile(); pr.enable(); run(2048); pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
