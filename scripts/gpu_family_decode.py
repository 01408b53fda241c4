"""Single-sequence decode paths of one model on the GPU, tok/s each (128 steps after a 32-token
prompt): decode_greedy (the fused decoder's graphs, or, for a family it does not take, the
one-row batch step with the device's argmax), decode_batch_sample one row at a time (greedy and
sampled: the step loop's path for such a family), and forward + NumPy argmax (what decode_greedy
did for such a family before). Usage: gpu_family_decode.py MODEL [STEPS]"""
import sys
import time

import numpy as np

from orcd import _orcd_cuda as cu

path = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 128
e = cu.CudaEngine(path, 512, 1)
print("paths:", {k: v for k, v in e.paths().items() if "fast" in k or "graph" in k})
prompt = np.arange(100, 132, dtype=np.int32)


def timed(name, run):
    e.forward(0, prompt, 0)
    run()  # warm-up (graphs captured)
    e.forward(0, prompt, 0)
    t0 = time.perf_counter()
    toks = run()
    dt = time.perf_counter() - t0
    print(f"{name:<44} {N / dt:9.1f} tok/s   first tokens {list(toks[:6])}")
    return toks


def greedy():
    return [int(t) for t in e.decode_greedy(0, 7, len(prompt), N)]


def logits_loop():
    t, out = 7, []
    for i in range(N):
        t = int(np.argmax(e.forward(0, np.array([t], np.int32), len(prompt) + i)))
        out.append(t)
    return out


def sample_loop(params):
    def run():
        t, out, state = 7, [], 1234
        for i in range(N):
            r = e.decode_sample(0, t, len(prompt) + i, params, state, np.array([t], np.int32), -1, None)
            t, state = int(r[0]), r[1]
            out.append(t)
        return out
    return run


a = timed("decode_greedy", greedy)
b = timed("forward + argmax (logits to the host)", logits_loop)
print("decode_greedy == forward + argmax:", a == b, "(equal up to near-ties; first difference at",
      next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None), ")")
timed("decode_sample greedy, one token a call", sample_loop((0.0, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 64)))
timed("decode_sample T0.7 k40 p0.95 min_p0.05", sample_loop((0.7, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 64)))
e.close()
