"""Where the time of one sampled Model.chat token goes on the GPU: the wall time per token, the
share spent inside the engine's decode_sample call (the rest is Python: the sampler state, the
stream decoder, stop checks), and the kernel times from torch.profiler (CUPTI sees every kernel:
the fused decode step's and the sampler's). Usage: gpu_chat_trace.py MODEL [N_TOKENS]"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import orcd

path = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 128
torch.zeros(1, device="cuda")
m = orcd.Model(path, device="cuda", n_ctx=2048)
msgs = [{"role": "user", "content": "Write a long story about a GPU that learns to paint."}]
kw = dict(max_tokens=N, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=1, ignore_eos=True)


class Timed:
    """The engine with its decode_sample calls timed."""

    def __init__(self, e):
        self.e, self.t, self.n = e, 0.0, 0

    def _timed(self, call, *a, **k):
        t0 = time.perf_counter()
        r = call(*a, **k)
        self.t += time.perf_counter() - t0
        self.n += 1
        return r

    def decode_sample(self, *a, **k):
        return self._timed(self.e.decode_sample, *a, **k)

    def decode_sample_steps(self, *a, **k):  # Model's blocks of DEVICE_BLOCK tokens
        return self._timed(self.e.decode_sample_steps, *a, **k)

    def __getattr__(self, name):
        return getattr(self.e, name)


m.chat(msgs, **kw)
real = m._engine
m._engine = Timed(real)
t0 = time.perf_counter()
out = m.chat(msgs, **kw)
dt = time.perf_counter() - t0
te = m._engine
print(f"{len(out.token_ids)} tokens in {dt * 1e3:.1f} ms: {dt / len(out.token_ids) * 1e6:.0f} us a token, "
      f"decode_sample {te.t / max(te.n, 1) * 1e6:.0f} us a call x {te.n}, the rest "
      f"{(dt - te.t) / len(out.token_ids) * 1e6:.0f} us a token")
m._engine = real
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    m.chat(msgs, **kw)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
# the GPU's busy time against the span of its kernels: what the device waits for between them
kern = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
if kern:
    busy, cur_s, cur_e = 0.0, kern[0][0], kern[0][1]
    for s0, e0 in kern[1:]:
        if s0 > cur_e:
            busy += cur_e - cur_s
            cur_s = s0
        cur_e = max(cur_e, e0)
    busy += cur_e - cur_s
    span = kern[-1][1] - kern[0][0]
    print(f"GPU kernels: {len(kern)}, span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms "
          f"({busy / max(span, 1) * 100:.1f}%), per token {span / N:.0f} us span, {busy / N:.0f} us busy")
m.close()
