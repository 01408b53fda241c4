"""The decode attention's variants at cache depths (GPU machine): the kernel alone, and the
fused decode step of a real model after a long prompt; and the device sampler's time per call.

    python3 scripts/gpu_attn_sweep.py [--model MODEL.gguf] [--depths 4096,16384] [--json OUT]

1. `dec_attn_time` (cuda/cuda_api.h): microseconds per launch of each variant at each depth,
   24 separate caches per round (K/V from HBM as in a step), zeros (the time does not depend
   on the values), the 0.5B (14 heads / 2 KV heads / 64) and 1.5B (12 / 2 / 128) shapes.
3. `sample_rows_time`: the device sampler on random logits of the Qwen2 vocabulary (rows 1/8/64)
   with the user path's parameters (T=0.7, top_k 40, top_p 0.95, min_p 0.05) and greedy.
2. With --model: for each engine option set, CudaEngine.profile_decode after a prompt of each
   depth: the graph step (what a token costs) and the attention's marginal cost.
"""
import argparse
import json
import os

import numpy as np

# (name, dec_attn_time keyword arguments)
KERNEL_VARIANTS = [
    ("global 64 splits", dict(cluster=0, max_splits=64, split_keys=32)),
    ("global 32 splits", dict(cluster=0, max_splits=32, split_keys=32)),
    ("cluster 8 cuda cores", dict(cluster=8)),
    ("cluster 8 mma", dict(cluster=8, cluster_mma=True)),
    ("cluster 16 mma", dict(cluster=16, cluster_mma=True)),
    ("cluster 16 mma x2", dict(cluster=16, cluster_mma=True, clusters=2)),
    ("cluster 16 mma x4", dict(cluster=16, cluster_mma=True, clusters=4)),
    ("cluster 1 mma x16", dict(cluster=1, cluster_mma=True, clusters=16)),
    ("cluster 2 mma x16", dict(cluster=2, cluster_mma=True, clusters=16)),
    ("cluster 4 mma x8", dict(cluster=4, cluster_mma=True, clusters=8)),
    ("cluster 16 mma staged 256", dict(cluster=16, cluster_mma=True, stage=256)),
    ("cluster 16 mma x2 staged 512", dict(cluster=16, cluster_mma=True, clusters=2, stage=512)),
    ("cluster 16 mma x4 staged 256", dict(cluster=16, cluster_mma=True, clusters=4, stage=256)),
]
# (name, set_options keyword arguments) for the engine's decode step
ENGINE_VARIANTS = [
    ("default", dict()),
    ("stage 256", dict(attn_stage=256)),
    ("stage 512", dict(attn_stage=512)),
    ("stage 128", dict(attn_stage=128)),
    ("stage 512 span 16384", dict(attn_stage=512, cluster_span=16384)),
    ("stage 256 cluster 8", dict(attn_stage=256, cluster_size=8)),
    ("span 4096", dict(cluster_span=4096)),
    ("deep early: qkv+attn_output", dict(pdl_early_kinds_deep=5)),
    ("deep early: qkv+attention+attn_output", dict(pdl_early_kinds_deep=7)),
    ("deep early: attention+attn_output", dict(pdl_early_kinds_deep=6)),
    ("deep early: qkv+attention", dict(pdl_early_kinds_deep=3)),
    ("deep early: qkv", dict(pdl_early_kinds_deep=1)),
    ("deep early: all", dict(pdl_early_kinds_deep=63)),
    ("direct_keys 128", dict(direct_keys=128)),
    ("direct_keys 0", dict(direct_keys=0)),
    ("span 2048", dict(cluster_span=2048)),
    ("span 5120", dict(cluster_span=5120)),  # 1 cluster to 5,120 positions, 2 to 10,240, 4 to 20,480
    # each layer's rows into L2 a layer ahead (options' kv_prefetch, 1 by default: from the previous
    # ffn_down, the attention without its own prefetch; 2: both)
    ("kv ahead and own", dict(kv_prefetch=2)),
    ("c1 span 256", dict(cluster_size=1, cluster_span=256)),
    ("c1 span 512", dict(cluster_size=1, cluster_span=512)),
    ("c1 span 1024", dict(cluster_size=1, cluster_span=1024)),
    ("c2 span 256", dict(cluster_size=2, cluster_span=256)),
    ("c2 span 512", dict(cluster_size=2, cluster_span=512)),
    ("c4 span 512", dict(cluster_size=4, cluster_span=512)),
    ("c4 span 1024", dict(cluster_size=4, cluster_span=1024)),
    ("c8 span 1024", dict(cluster_size=8, cluster_span=1024)),
    ("c8 span 2048", dict(cluster_size=8, cluster_span=2048)),
    ("span 16384", dict(cluster_span=16384)),
    ("cluster 8", dict(cluster_size=8)),
    ("global merge only", dict(cluster_keys=0, direct_keys=0)),
    ("round-6 options", dict(cluster_keys=1024, cluster_size=8, cluster_mma=False, cluster_span=1 << 30,
                             direct_keys=0)),
    # the defaults one at a time back to round 16's (perf_log run 74), and all three (the span with
    # run 76's rule: the fewest clusters of at most span positions, where round 16 took the most
    # clusters of at least span positions: four at 16,385 positions where it took two)
    ("no kv ahead", dict(kv_prefetch=0)),
    ("lm cp.async", dict(lm_bulk=False)),
    ("round-16 options", dict(kv_prefetch=0, lm_bulk=False, cluster_span=8192)),
]
DEFAULTS = dict(cluster_keys=1 << 30, split_keys=32, cluster_size=16, cluster_mma=True, cluster_span=8192,
                direct_keys=512, pdl_early_kinds=-1, pdl_early_kinds_deep=-1, attn_stage=0,
                lm_bulk=True, kv_prefetch=1, attn_trace=False)
# the cluster attention's trace fields (dec_attn_kernel): start 0, waited 1, q ready 2 (the first K/V
# tile in flight), tiles done 8, warps' partials stored 9, block partial 3, cluster barrier passed 4,
# merge inputs loaded 10, merge stored 5, end 6 (7: SM)
PHASES = [("wait", 0, 1), ("ready", 1, 2), ("tiles", 2, 8), ("wo", 8, 9), ("wmerge", 9, 3), ("cl.barrier", 3, 4),
          ("dsmem", 4, 10), ("store", 10, 5), ("exit", 5, 6)]
BLOCK_FIELDS = {2, 8, 9, 3}  # written by blocks with keys only


CLOCK_FIELD = 11  # field CLOCK_FIELD + mark: the SM's cycle counter at that mark (cuda/decode.cuh)
CYC_WAITED = 22   # the cycle counter when the push merge's first cluster barrier wait returned


def trace_summary(p, n_head_kv):
    """Medians over layers and blocks of each phase of the cluster attention (us), the launch's
    start skew, and the kernel's span from its last block's wait to its last block's end. With
    the cycle stamps (records of 22+ fields): each phase again from the block's cycle counter
    ("<phase> cyc", us at the SM clock estimated from the blocks' spans: "clock GHz").
    The stamps stay integers until they are differences: the global timer counts nanoseconds
    since the epoch (~1.8e18), where a float64 holds only every 256th value."""
    gx, f = p["attn_grid_x"], p.get("attn_trace_fields", 16)
    raw = np.array(p["attn_trace"], dtype=np.int64).reshape(-1, 64 * n_head_kv, f)[:, : gx * n_head_kv]
    gt = raw[:, :, :CLOCK_FIELD]
    starts = gt[:, :, 0][gt[:, :, 0] > 0]  # (mark 0: every block's; field 7 is its SM, not a time)
    base = starts.min() if starts.size else 0
    tr = np.where(gt > 0, gt - base, 0).astype(np.float64) / 1000.0  # us since the first block's start
    act = raw[:, :, 3] > 0  # blocks with keys
    r = {}
    for name, a, b in PHASES:
        d = tr[:, :, b] - tr[:, :, a]
        d = d[act] if a in BLOCK_FIELDS or b in BLOCK_FIELDS else d.reshape(-1)
        r[name] = float(np.median(d))
    if f >= CLOCK_FIELD + 11:
        cyc = raw[:, :, CLOCK_FIELD:CLOCK_FIELD + 11]
        span_ns, span_c = gt[:, :, 6] - gt[:, :, 0], cyc[:, :, 6] - cyc[:, :, 0]
        # the ratio of the sums: each span's timer rounding averages out over many blocks (a
        # median of per-block ratios would keep it)
        long = span_ns >= 4000  # spans of several microseconds
        ghz = float(span_c[long].sum() / span_ns[long].sum()) if long.any() else float("nan")
        r["clock GHz"] = ghz
        for name, a, b in PHASES:
            d = (cyc[:, :, b] - cyc[:, :, a]) / (ghz * 1000.0)
            d = d[act] if a in BLOCK_FIELDS or b in BLOCK_FIELDS else d.reshape(-1)
            r[name + " cyc"] = float(np.median(d))
        if f > CYC_WAITED:  # wmerge split at the push merge's first cluster barrier wait
            w = raw[:, :, CYC_WAITED]
            pushed = act & (w > 0)
            if pushed.any():
                r["cl.wait cyc"] = float(np.median((w - cyc[:, :, 9])[pushed])) / (ghz * 1000.0)
                r["merge cyc"] = float(np.median((cyc[:, :, 3] - w)[pushed])) / (ghz * 1000.0)
    r["skew"] = float(np.median(tr[:, :, 0].max(1) - tr[:, :, 0].min(1)))
    r["after wait"] = float(np.median(tr[:, :, 6].max(1) - tr[:, :, 1].max(1)))
    r["span"] = float(np.median(tr[:, :, 6].max(1) - tr[:, :, 0].min(1)))
    r["to next"] = float(np.median(tr[1:, :, 0].min(1) - tr[:-1, :, 6].max(1))) if len(tr) > 1 else float("nan")
    return r


def main():
    from orcd import _orcd_cuda as cu  # (here: trace_summary is importable without a GPU build)

    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--depths", default="64,1024,4096,16384,32768")
    ap.add_argument("--engine-depths", default="64,200,400,1024,4096,8192,16384,32000")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel-alone and sampler timings")
    ap.add_argument("--no-sampler", action="store_true", help="skip the sampler timings")
    ap.add_argument("--sampler-only", action="store_true", help="only the sampler timings")
    ap.add_argument("--sampler-iters", type=int, default=50)
    ap.add_argument("--sampler-rows", default="1,8,64")
    ap.add_argument("--variants", default=os.environ.get("ATTN_VARIANTS"),
                    help="comma-separated engine variant names (default: $ATTN_VARIANTS, else all)")
    ap.add_argument("--trace", default=os.environ.get("ATTN_TRACE"),
                    help="comma-separated engine variant names to trace (the cluster attention's phases, us)")
    ap.add_argument("--trace-depths", default="1024,4096,16384")
    ap.add_argument("--json")
    a = ap.parse_args()
    out = {"kernel": [], "engine": [], "sampler": []}
    depths = [int(x) for x in a.depths.split(",")]
    for shape_name, (nh, nkv, hd) in [] if a.no_kernel or a.sampler_only else (("0.5B", (14, 2, 64)), ("1.5B", (12, 2, 128))):
        print(f"dec_attn_time, {shape_name} shape ({nh} heads, {nkv} KV heads, head_dim {hd}): us per launch")
        print(f"{'variant':<40}" + "".join(f"{d:>9}" for d in depths))
        for name, kw in KERNEL_VARIANTS:
            row = []
            for d in depths:
                try:
                    us = cu.dec_attn_time(nh, nkv, hd, d, layers=24 if d <= 16384 else 8, iters=20, **kw)
                except Exception as err:  # a variant the GPU refuses (e.g. cluster size): say so, go on
                    print(f"  {name} at {d}: {err}")
                    us = float("nan")
                row.append(us)
                out["kernel"].append(dict(shape=shape_name, variant=name, n_kv=d, us=us))
            print(f"{name:<40}" + "".join(f"{u:>9.2f}" for u in row))
    rng = np.random.default_rng(0)
    sampler = [("T0.7 k40 p0.95 min_p0.05", (0.7, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 64)),
               ("T0.7 k40 + repetition 1.1", (0.7, 40, 0.95, 0.05, 1.1, 0.0, 0.0, 64)),
               ("greedy", (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 64)),
               ("T0.7 top_k off (OpenAI's defaults)", (0.7, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 64))]
    no_sampler = a.no_kernel or a.no_sampler
    if not no_sampler:
        print("sample_rows_time (151,936 logits a row): us per call")
    for rows in () if no_sampler else [int(r) for r in a.sampler_rows.split(",")]:
        logits = (rng.standard_normal((rows, 151936)) * 2).astype(np.float32)
        hist = [rng.integers(0, 151936, 200).astype(np.int32) for _ in range(rows)]
        for name, p in sampler:
            for split, full in ((True, True), (True, False), (False, False)):
                us = cu.sample_rows_time(logits, [p] * rows, hist, split, a.sampler_iters, split_full=full)
                out["sampler"].append(dict(rows=rows, params=name, split=split, split_full=full, us=us))
                print(f"  rows={rows:<3} {name:<36} split={split!s:<5} full={full!s:<5} {us:8.1f}")
    if a.model and not a.sampler_only:
        eds = [int(x) for x in a.engine_depths.split(",")]
        e = cu.CudaEngine(a.model, max(eds) + 80, 1)
        toks = np.random.default_rng(0).integers(100, 1000, max(eds)).astype(np.int32)
        e.forward(0, toks, 0)
        print("engine decode step after a prompt: graph_step us (attention marginal us)")
        print(f"{'options':<28}" + "".join(f"{d:>17}" for d in eds))
        want = set(a.variants.split(",")) if a.variants else None
        for name, opts in ENGINE_VARIANTS:
            if want is not None and name not in want:
                continue
            e.set_options(**DEFAULTS)
            e.set_options(**opts)
            cells = []
            for d in eds:
                p = e.profile_decode(0, 100, d, 32)
                cells.append(f"{p['graph_step']:7.1f} ({p['marginal_attention']:5.1f})")
                out["engine"].append(dict(variant=name, pos=d, **{k: v for k, v in p.items()}))
            print(f"{name:<28}" + "".join(f"{c:>17}" for c in cells), flush=True)
        if a.trace:
            nkv = int(e.info()["n_head_kv"])
            print("cluster attention phases (median us over layers and blocks; after wait: the last "
                  "block's wait to the last block's end; to next: the next layer's first start)")
            names = [n for n, _, _ in PHASES] + ["skew", "after wait", "span", "to next"]
            print(f"{'options':<24}{'depth':>7}{'step':>8}" + "".join(f"{n:>11}" for n in names))
            for name, opts in ENGINE_VARIANTS:
                if name not in a.trace.split(","):
                    continue
                for d in [int(x) for x in a.trace_depths.split(",")]:
                    e.set_options(**DEFAULTS)
                    e.set_options(**opts, attn_trace=True, direct_keys=0)
                    p = e.profile_decode(0, 100, d, 16)
                    if "attn_trace" not in p:
                        print(f"{name:<24}{d:>7}: no cluster attention traced")
                        continue
                    r = trace_summary(p, nkv)
                    out.setdefault("trace", []).append(dict(variant=name, pos=d, graph_step=p["graph_step"], **r))
                    print(f"{name:<24}{d:>7}{p['graph_step']:>8.1f}" + "".join(f"{r[n]:>11.2f}" for n in names),
                          flush=True)
                    if "clock GHz" in r:  # the same phases from the cycle counter
                        split = (f"   (wmerge: cluster wait {r['cl.wait cyc']:.2f}, merge {r['merge cyc']:.2f})"
                                 if "merge cyc" in r else "")
                        print(f"{'  (cycles, ' + format(r['clock GHz'], '.2f') + ' GHz)':<39}"
                              + "".join(f"{r[n + ' cyc']:>11.2f}" for n, _, _ in PHASES) + split, flush=True)
        e.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
