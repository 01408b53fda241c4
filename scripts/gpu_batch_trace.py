"""Kernel time of B sequences generating through the step loop, from torch.profiler
(CUPTI sees every kernel of the process, ours and cuBLAS's). Usage: gpu_batch_trace.py MODEL B [N_TOKENS]"""
import sys, time
import orcd
from orcd.batch import BatchRunner
import torch
from torch.profiler import profile, ProfilerActivity

path, B = sys.argv[1], int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 64
torch.zeros(1, device="cuda")
r = BatchRunner(path, device="cuda", n_ctx=1024, n_slots=max(B, 2))
p = orcd.SamplingParams(max_tokens=N, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=1)


def go():
    reqs = [r.submit(list(range(100 + i, 228 + i)), p) for i in range(B)]
    for q in reqs:
        q.wait(120)


go()
go()
t0 = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    go()
dt = time.perf_counter() - t0
print(f"B={B}: {B * N} tokens in {dt * 1e3:.1f} ms (incl. prompts and profiler overhead)")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
r.close()
