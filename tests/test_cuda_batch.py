"""The multi-sequence decode step of the CUDA engine (cuda/batch_graph.cuh, cuda/resident_f16.cuh)
and the split device sampler (cuda/sample.cuh).

What must hold, and the bounds:
- Batch graphs: a step of n rows runs padded to a row bucket over a cache bucket and is replayed
  from a CUDA graph. Graphs on and off give bitwise equal logits (the same kernels on the same
  buffers), also across a cache-bucket boundary (positions 250..262 cross 256), and a graph is
  shared by the row counts of one bucket (3 and 4 rows: one graph).
- Padding: the padded rows repeat the last real row, so the real rows of a padded batch are
  bitwise those of a batch where a real row stands in the padding (17 vs 18 rows on the GEMM
  path, both padded to 24; 3 vs 4 on the mat-vec path).
- A batch against each sequence alone on the same (mat-vec) path: the attention splits differ,
  so logits agree to 1e-4 x the largest |logit| (float32 sums in another order); the real model's
  greedy tokens through the step loop are those of each prompt run alone.
- Resident fp16 weights: the same fp16 values feed the GEMMs, so the layers are bitwise equal;
  the lm_head runs as one GEMM instead of chunks (another reduction order): logits agree to
  1e-4 x the largest |logit| and greedy tokens are equal unless the top-2 margin is within twice
  the measured difference. Its size equals the sum over the groups that are not all F16
  (q|k|v, o, gate|up, down per layer, the lm_head) of 2 bytes per element, 256-byte aligned.
- Split sampling: tokens and generator states bitwise equal to the one-block kernel for the
  same logits and states (random rows with ties, NaN and infinities, penalties, every supported
  top_k up to 1024, vocabularies of one slice, a last slice of 1..4 logits, 151936).

Skipped as a whole when orcd._orcd_cuda is missing or no usable GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()

REL = 1e-4  # logits of two paths that differ only in the order of float32 sums


def _params(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.0,
            frequency_penalty=0.0, penalty_last_n=64):
    return (float(temperature), int(top_k), float(top_p), float(min_p), float(repetition_penalty),
            float(presence_penalty), float(frequency_penalty), int(penalty_last_n))


def _n_vocab(path):
    e = cu.CudaEngine(path, 8, 1)
    V = e.n_vocab
    e.close()
    return V


def _prefilled(path, n_ctx, n_slots, prompts, **options):
    e = cu.CudaEngine(path, n_ctx, n_slots)
    if options:
        e.set_options(**options)
    first = [int(np.argmax(e.forward(s, p, 0))) for s, p in enumerate(prompts)]
    return e, first


def _prompts(V, n, lo, hi, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def _step(e, slots, toks, pos):
    return e.decode_batch(np.asarray(slots, np.int32), np.asarray(toks, np.int32), np.asarray(pos, np.int32))


def _assert_close(a, b, what, rel=REL):
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), what
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    assert diff <= rel * scale, f"{what}: max |diff| {diff:.3g} > {rel} x {scale:.3g}"
    return diff


# ------------------------------------------------------------------ graphs and buckets

@pytest.mark.parametrize("wtype,n", [("Q4_K", 3), ("Q5_0", 5), ("Q4_K", 17), ("Q8_0", 11)])
def test_graphs_equal_direct_across_kv_bucket(tiny_model, wtype, n):
    """Graph replay == uncaptured launches, bitwise, every step; positions cross 256 (a
    cache bucket) during the run; rows on the mat-vec path (n <= 8) and the GEMM path."""
    path = tiny_model(wtype)
    V = _n_vocab(path)
    prompts = _prompts(V, n, 243, 252, seed=n)
    on, first = _prefilled(path, 320, 24, prompts)
    off, first_off = _prefilled(path, 320, 24, prompts, batch_graphs=False)
    assert first == first_off
    assert on.paths()["batch_graphs"] and not off.paths()["batch_graphs"]
    toks = first
    pos = [len(p) for p in prompts]
    order = np.random.default_rng(1).permutation(n)  # slot order within the batch does not matter
    for step in range(14):
        slots = order if step % 2 else np.arange(n)
        a = _step(on, slots, [toks[s] for s in slots], [pos[s] for s in slots])
        b = _step(off, slots, [toks[s] for s in slots], [pos[s] for s in slots])
        assert np.array_equal(a, b), f"step {step}: graph replay differs from direct launches"
        for j, s in enumerate(slots):
            toks[s] = int(np.argmax(a[j]))
        pos = [p + 1 for p in pos]
    assert max(pos) > 257 and min(pos) - 14 < 256  # the run crossed the 256 bucket
    assert on.paths()["batch_graphs_cached"] >= 1, on.paths()
    assert off.paths()["batch_graphs_cached"] == 0
    on.close()
    off.close()


def test_one_graph_per_bucket(tiny_model):
    """3 and 4 rows share the 4-row bucket (one graph); 5 rows use the 8-row one."""
    path = tiny_model("Q8_0")
    prompts = _prompts(_n_vocab(path), 6, 5, 9, seed=3)
    e, first = _prefilled(path, 64, 8, prompts)
    pos = [len(p) for p in prompts]

    def step(n):
        _step(e, range(n), first[:n], pos[:n])
        for s in range(n):
            pos[s] += 1

    step(3)  # first use of (4 rows, 256 keys): uncaptured
    assert e.paths()["batch_graphs_cached"] == 0
    step(4)  # second use: captured
    assert e.paths()["batch_graphs_cached"] == 1
    step(3)
    step(4)
    assert e.paths()["batch_graphs_cached"] == 1
    step(5)
    step(5)
    assert e.paths()["batch_graphs_cached"] == 2
    e.set_options(batch_graphs=True)  # set_options drops the graphs
    assert e.paths()["batch_graphs_cached"] == 0
    e.close()


@pytest.mark.parametrize("n", [3, 17])
def test_padding_leaves_real_rows_unchanged(tiny_model, n):
    """n rows (padded with copies of the last) against n+1 rows in the same bucket: rows
    [0, n) bitwise equal over steps, so the padded rows neither disturb the other rows'
    caches nor their products."""
    path = tiny_model("Q5_0", tensor_types={"ffn_down.weight": "Q6_K", "attn_v.weight": "Q8_0"})
    V = _n_vocab(path)
    prompts = _prompts(V, n + 1, 4, 30, seed=10 + n)
    a, first = _prefilled(path, 128, 24, prompts)
    b, _ = _prefilled(path, 128, 24, prompts)
    toks, pos = list(first), [len(p) for p in prompts]
    for step in range(8):
        la = _step(a, range(n), toks[:n], pos[:n])
        lb = _step(b, range(n + 1), toks[:n + 1], pos[:n + 1])
        assert np.array_equal(la, lb[:n]), f"step {step}: padding changed a real row"
        toks = [int(np.argmax(r)) for r in lb]
        pos = [p + 1 for p in pos]
    a.close()
    b.close()


@pytest.mark.parametrize("wtype", ["Q4_K", "Q8_0"])
def test_batch_matches_each_alone(tiny_model, wtype):
    """A 5-row batch (mat-vec path, padded to 8) over positions crossing 256 against each
    sequence alone on the same path (a single-token forward with the fused step off)."""
    path = tiny_model(wtype)
    V = _n_vocab(path)
    prompts = _prompts(V, 5, 246, 252, seed=7)
    batch, first = _prefilled(path, 320, 8, prompts)
    alone = []
    for p in prompts:
        e = cu.CudaEngine(path, 320, 1)
        e.set_options(fast_decode=False)
        e.forward(0, p, 0)
        alone.append(e)
    toks, pos = list(first), [len(p) for p in prompts]
    for step in range(10):
        lb = _step(batch, range(5), toks, pos)
        for s in range(5):
            la = alone[s].forward(0, np.array([toks[s]], np.int32), pos[s])
            _assert_close(lb[s], la, f"step {step} slot {s}")
        toks = [int(np.argmax(r)) for r in lb]
        pos = [p + 1 for p in pos]
    for e in alone + [batch]:
        e.close()


# ------------------------------------------------------------------ resident fp16 weights

def _expected_resident_bytes(path):
    from orcd import _orcd
    f = _orcd.GGUFFile(path)  # the native reader: tensor_infos() -> (name, ne, type_name, ...)
    try:
        infos = {t[0]: t for t in f.tensor_infos()}
    finally:
        f.close()

    def elems(name):
        return int(np.prod(infos[name][1]))

    def group(names):
        if all(infos[n][2] == "F16" for n in names):
            return 0
        b = 2 * sum(elems(n) for n in names)
        return (b + 255) // 256 * 256

    n_layer = 1 + max(int(k.split(".")[1]) for k in infos if k.startswith("blk."))
    total = 0
    for i in range(n_layer):
        blk = f"blk.{i}."
        total += group([blk + "attn_q.weight", blk + "attn_k.weight", blk + "attn_v.weight"])
        total += group([blk + "attn_output.weight"])
        total += group([blk + "ffn_gate.weight", blk + "ffn_up.weight"])
        total += group([blk + "ffn_down.weight"])
    total += group(["output.weight" if "output.weight" in infos else "token_embd.weight"])
    return total


@pytest.mark.parametrize("wtype,tied,mixed", [("Q4_K", False, False), ("Q5_0", True, True), ("F16", False, False),
                                              ("BF16", False, False)])
def test_resident_f16_same_results(tiny_model, wtype, tied, mixed, monkeypatch):
    """Resident fp16 weights on vs off: its size as planned, prompts (all_logits) and an
    11-row decode batch (GEMM path) within REL, the same greedy tokens."""
    monkeypatch.delenv("ORCD_CUDA_RESIDENT_F16", raising=False)
    kw = dict(tensor_types={"ffn_down.weight": "Q6_K", "attn_v.weight": "Q8_0", "ffn_up.weight": "F16"}) if mixed else {}
    path = tiny_model(wtype, tied=tied, **kw)
    V = _n_vocab(path)
    prompts = _prompts(V, 11, 3, 20, seed=5)
    on = cu.CudaEngine(path, 64, 12)
    off = cu.CudaEngine(path, 64, 12)
    off.set_options(resident_f16=False)
    want = _expected_resident_bytes(path)
    assert on.paths()["resident_f16_bytes"] == want == on.info()["vram_resident_f16"], on.paths()
    assert on.paths()["resident_f16"] == (want > 0)
    assert not off.paths()["resident_f16"]
    assert on.info()["vram_bytes"] == on.info()["vram_weights"] + on.info()["vram_kv"] + \
        on.info()["vram_scratch"] + want
    toks = []
    for s, p in enumerate(prompts):
        a = on.forward(s, p, 0, all_logits=True)
        b = off.forward(s, p, 0, all_logits=True)
        _assert_close(a, b, f"prompt {s} all_logits")
        toks.append(int(np.argmax(b[-1])))
    pos = [len(p) for p in prompts]
    for step in range(6):
        a = _step(on, range(11), toks, pos)
        b = _step(off, range(11), toks, pos)
        diff = _assert_close(a, b, f"step {step}")
        for r in range(11):
            ta, tb = int(np.argmax(a[r])), int(np.argmax(b[r]))
            if ta != tb:  # only a near tie may differ
                assert abs(b[r][ta] - b[r][tb]) <= 2 * diff, f"step {step} row {r}: {ta} vs {tb}"
        toks = [int(np.argmax(r)) for r in b]
        pos = [p + 1 for p in pos]
    on.close()
    off.close()


def test_resident_f16_switch_from_environment(tiny_model, monkeypatch):
    monkeypatch.setenv("ORCD_CUDA_RESIDENT_F16", "0")
    path = tiny_model("Q4_0")
    e = cu.CudaEngine(path, 32, 2)
    assert e.options()["resident_f16"] is False
    p = e.paths()
    assert p["resident_f16_bytes"] == 0 and not p["resident_f16"]
    assert e.info()["vram_resident_f16"] == 0
    e.set_options(resident_f16=True)  # no copy was made: nothing to use
    assert not e.paths()["resident_f16"]
    e.close()
    for name, field in (("ORCD_CUDA_BATCH_GRAPHS", "batch_graphs"), ("ORCD_CUDA_SAMPLE_SPLIT", "sample_split")):
        monkeypatch.setenv(name, "0")
        e = cu.CudaEngine(path, 32, 2)
        assert e.options()[field] is False and not e.paths()[field]
        e.close()
        monkeypatch.delenv(name)


# ------------------------------------------------------------------ split sampling

def _random_rows(rng, n, V):
    x = rng.normal(0, 3, size=(n, V)).astype(np.float32)
    x[: n // 2] *= 2.5
    x[:, 5:9] = x[:, 4:5]  # exact ties, -0/+0, NaN and infinities
    x[:, 10] = -0.0
    x[:, 11] = 0.0
    x[::3, 12] = np.nan
    x[1::4, 13] = -np.inf
    x[2::7, min(14, V - 1)] = np.inf
    x[3] = 1.25                     # a row of ties
    x[4, :] = -np.inf               # nothing finite
    x[5, : V - 3] = -np.inf         # fewer finite logits than top_k
    if V > 2 * 4096:                # the same maximum in two slices (row 9: top_k 1)
        x[9, 100] = x[9, 4096 + 7] = 1e6
    return x


@pytest.mark.parametrize("V", [151936, 3001, 4097, 4100, 9000])
def test_split_sampling_equals_one_block(V):
    rng = np.random.default_rng(V)
    n = 96
    x = _random_rows(rng, n, V)
    choices = [
        dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.7),
        dict(top_k=1, top_p=1.0, min_p=0.0, temperature=1.0),
        dict(top_k=1024, top_p=0.9, min_p=0.0, temperature=1.3),
        dict(top_k=7, top_p=0.5, min_p=0.3, temperature=0.4),
        dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
        dict(top_k=40, top_p=1.0, min_p=0.0, temperature=2.0, repetition_penalty=1.2, frequency_penalty=0.3,
             presence_penalty=0.2, penalty_last_n=-1),
        dict(top_k=0, top_p=1.0, min_p=0.05, temperature=1.0),  # top_k off: the one-block kernel in both
        dict(top_k=600, top_p=0.99, min_p=0.01, temperature=0.9, presence_penalty=-0.5),
    ]
    plist, hist = [], []
    for r in range(n):
        c = dict(choices[r % len(choices)])
        if c.get("top_k", 0) >= V:
            c["top_k"] = V - 1
        plist.append(_params(**c))
        hist.append(rng.integers(0, V, size=int(rng.integers(0, 300))).astype(np.int32))
    states = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    t1, s1 = cu.test_sample_rows(x, plist, states, hist, split=True)
    t0, s0 = cu.test_sample_rows(x, plist, states, hist, split=False)
    t1, t0 = np.asarray(t1), np.asarray(t0)
    bad = np.nonzero(t1 != t0)[0]
    assert bad.size == 0, [(int(r), int(t1[r]), int(t0[r]), plist[r]) for r in bad[:5]]
    assert np.array_equal(np.asarray(s1), np.asarray(s0))
    assert t0[4] == -1  # nothing finite: no token on either path


@pytest.mark.parametrize("V", [151936, 3001, 4097, 9000])
def test_split_full_sampling_equals_one_block(V):
    """split_full: rows with top_k off (the whole vocabulary; with min_p, penalties, temperatures
    from 0.3 to 2, rows of ties, NaN and infinities) take the slice kernel, the chunk sums over many
    blocks and the scan and walk in one block: tokens and generator states bitwise those of the
    one-block kernel, beside top_k and greedy rows in the same launch (V = 3001: one slice, the
    workspace row sized for the sums)."""
    rng = np.random.default_rng(V + 1)
    n = 64
    x = _random_rows(rng, n, V)
    choices = [
        dict(top_k=0, top_p=1.0, min_p=0.0, temperature=0.7),
        dict(top_k=0, top_p=1.0, min_p=0.05, temperature=1.0),
        dict(top_k=0, top_p=1.0, min_p=0.2, temperature=0.3, repetition_penalty=1.3, frequency_penalty=0.4),
        dict(top_k=V, top_p=1.0, min_p=0.0, temperature=2.0, presence_penalty=0.5, penalty_last_n=-1),
        dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.7),
        dict(temperature=0.0),
    ]
    plist, hist = [], []
    for r in range(n):
        plist.append(_params(**choices[r % len(choices)]))
        hist.append(rng.integers(0, V, size=int(rng.integers(0, 300))).astype(np.int32))
    states = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    t1, s1 = cu.test_sample_rows(x, plist, states, hist, split=True, split_full=True)
    t0, s0 = cu.test_sample_rows(x, plist, states, hist, split=False)
    t1, t0 = np.asarray(t1), np.asarray(t0)
    bad = np.nonzero(t1 != t0)[0]
    assert bad.size == 0, [(int(r), int(t1[r]), int(t0[r]), plist[r]) for r in bad[:5]]
    assert np.array_equal(np.asarray(s1), np.asarray(s0))


def test_engine_decode_sample_split_equals_one_block(tiny_model):
    """The engine's single-sequence sampled step (the user path: fused step + sampling)
    with the split sampler (and its whole-vocabulary path) on and off: the same tokens and
    states for 80 generator states."""
    path = tiny_model("Q5_0", n_vocab=9000)
    e = cu.CudaEngine(path, 64, 1)
    prompt = np.random.default_rng(2).integers(0, e.n_vocab, 12).astype(np.int32)
    e.forward(0, prompt, 0)
    hist = np.concatenate([prompt, [17]]).astype(np.int32)
    rng = np.random.default_rng(4)
    for p in (_params(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05), _params(temperature=0.0),
              _params(temperature=1.1, top_k=1024, top_p=0.8, repetition_penalty=1.2),
              _params(temperature=0.8, top_k=0, top_p=1.0, min_p=0.02)):
        for _ in range(20):
            st = int(rng.integers(0, 2**63))
            e.set_options(sample_split=True, sample_split_full=True)
            a = e.decode_sample(0, 17, len(prompt), p, st, hist)
            e.set_options(sample_split=False, sample_split_full=False)
            b = e.decode_sample(0, 17, len(prompt), p, st, hist)
            assert a is not None and a == b, (p, st, a, b)
    e.close()


# ------------------------------------------------------------------ the real model through the step loop

def _long_prompts(tok, n):
    """n different prompts of ~240-260 tokens (the first decode steps cross the 256 bucket)."""
    out = []
    for i in range(n):
        words = " ".join(str(j * (i + 3) % 997) for j in range(120))
        ids = tok.encode(f"List {i}: {words}. Continue the list:")
        out.append([int(t) for t in ids[:250 + (i % 9)]])
    return out


def _run(path, prompts, n_slots, params, monkeypatch, **env):
    from orcd.batch import BatchRunner
    for k in ("ORCD_CUDA_BATCH_GRAPHS", "ORCD_CUDA_RESIDENT_F16", "ORCD_CUDA_SAMPLE_SPLIT", "ORCD_CUDA_FAST_DECODE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with BatchRunner(path, device="cuda", n_ctx=512, n_slots=n_slots) as r:
        reqs = [r.submit(p, params.replace(seed=100 + i)) for i, p in enumerate(prompts)]
        return [list(q) for q in reqs]


@pytest.mark.parametrize("B", [3, 5, 17])
def test_real_model_batched_greedy_equals_alone(real_model_path, tok, monkeypatch, B):
    """B prompts at once (24 slots: padded buckets, graphs) give each prompt's greedy tokens
    run alone (one slot, the fused step off so it takes the same GEMM path)."""
    from orcd.types import SamplingParams
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = _long_prompts(tok, B)
    got = _run(real_model_path, prompts, 24, p, monkeypatch)
    want = [_run(real_model_path, [q], 1, p, monkeypatch, ORCD_CUDA_FAST_DECODE="0")[0] for q in prompts]
    assert got == want


def test_real_model_switches_give_the_same_tokens(real_model_path, tok, monkeypatch):
    """17 sampled sequences (T=0.7, top_k 40, top_p 0.95, min_p 0.05, seeded): batch graphs
    off and the one-block sampler give the same tokens (bitwise the same logits and draws);
    resident fp16 off gives the same greedy tokens."""
    from orcd.types import SamplingParams
    prompts = _long_prompts(tok, 17)
    sp = SamplingParams(max_tokens=16, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, ignore_eos=True)
    base = _run(real_model_path, prompts, 24, sp, monkeypatch)
    assert _run(real_model_path, prompts, 24, sp, monkeypatch, ORCD_CUDA_BATCH_GRAPHS="0") == base
    assert _run(real_model_path, prompts, 24, sp, monkeypatch, ORCD_CUDA_SAMPLE_SPLIT="0") == base
    gp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert _run(real_model_path, prompts, 24, gp, monkeypatch, ORCD_CUDA_RESIDENT_F16="0") == \
        _run(real_model_path, prompts, 24, gp, monkeypatch)


def test_real_model_lone_request_blocks_equal_model(real_model_path, tok, monkeypatch):
    """A request alone in the step loop takes blocks of up to 8 device-sampled steps from one
    engine call (StepLoop::lone_block): its tokens are those of Model.generate on the GPU with
    the same seed (Model's own blocks: the same kernels and draws), across block boundaries
    (20 tokens after the first: blocks of 8, 8, 4), and a stop id inside a block ends it there
    without the token."""
    import orcd
    from orcd.batch import BatchRunner
    from orcd.types import SamplingParams
    for k in ("ORCD_CUDA_BATCH_GRAPHS", "ORCD_CUDA_RESIDENT_F16", "ORCD_CUDA_SAMPLE_SPLIT", "ORCD_CUDA_FAST_DECODE"):
        monkeypatch.delenv(k, raising=False)
    prompts = [[int(t) for t in tok.encode(s)] for s in ("def quicksort(xs):", "Write a limerick about caches.",
                                                          "SELECT name FROM users WHERE")]
    sp = SamplingParams(max_tokens=21, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, ignore_eos=True)
    with orcd.Model(real_model_path, device="cuda", n_ctx=512) as m:
        want = [m.generate(p, params=sp.replace(seed=7 + i)).token_ids for i, p in enumerate(prompts)]
    assert all(len(w) == 21 for w in want)
    with BatchRunner(real_model_path, device="cuda", n_ctx=512, n_slots=1) as r:
        for i, p in enumerate(prompts):  # one at a time: each alone in the loop
            req = r.submit(p, sp.replace(seed=7 + i))
            assert list(req) == want[i] and req.finish_reason == "length", i
        # a stop id first met at draw 11 (inside the second block) ends the request there
        stop = next(t for j, t in enumerate(want[0]) if j >= 11 and t not in want[0][:j])
        at = want[0].index(stop)
        req = r.submit(prompts[0], sp.replace(seed=7, stop_token_ids=[stop]))
        assert list(req) == want[0][:at] and req.finish_reason == "stop"
        st = r.stats()
        assert st["running"] == 0 and st["generated"] == 3 * 21 + at


def test_real_model_decode_sample_split_equals_one_block(real_model_path, tok):
    """The real vocabulary (151936 logits, 38 slices) on the user path: split on/off identical."""
    e = cu.CudaEngine(real_model_path, 256, 1)
    ids = np.asarray(tok.encode("def fib(n):\n    "), np.int32)
    e.forward(0, ids, 0)
    hist = np.concatenate([ids, [ids[-1]]]).astype(np.int32)
    rng = np.random.default_rng(9)
    for p in (_params(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05),
              _params(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1),
              _params(temperature=0.0)):
        for _ in range(20):
            st = int(rng.integers(0, 2**63))
            e.set_options(sample_split=True)
            a = e.decode_sample(0, int(ids[-1]), len(ids), p, st, hist)
            e.set_options(sample_split=False)
            b = e.decode_sample(0, int(ids[-1]), len(ids), p, st, hist)
            assert a is not None and a == b, (p, st, a, b)
    e.close()
