"""GPU sampling (cuda/sample_kernels.cu, sample_rows) against its CPU twin (cpp/sampler.cpp,
orcd._orcd.Sampler) and against the sampling chain written out in NumPy.

Bounds: greedy picks are identical. Seeded draws use the same generator stream, so the GPU
and CPU pick the same token except where a sum of probabilities lands within rounding of a
top_p target or of the drawn u (the GPU adds them in another order): at most 1% of rows may
differ. Draw frequencies follow the NumPy chain's probabilities (chi-square, p > 1e-4).
"""
from __future__ import annotations

import numpy as np
import pytest

from orcd import _orcd
from orcd.backend import cuda_available, cuda_module, cuda_status
from sampling_reference import chain_probs, chi_square_z

pytestmark = pytest.mark.skipif(not cuda_available(), reason=f"no usable CUDA GPU: {cuda_status()}")

FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "penalty_last_n")


def params(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.0,
           frequency_penalty=0.0, penalty_last_n=64):
    return (float(temperature), int(top_k), float(top_p), float(min_p), float(repetition_penalty),
            float(presence_penalty), float(frequency_penalty), int(penalty_last_n))


def cpu_sample(logits, p, state, history):
    s = _orcd.Sampler(*p, seed=0)
    s.rng_state = int(state)
    tok = s.sample(np.ascontiguousarray(logits, np.float32), np.asarray(history, np.int32))
    return tok, s.rng_state


def gpu_sample(logits, plist, states, histories):
    c = cuda_module()
    toks, new_states = c.test_sample_rows(np.ascontiguousarray(logits, np.float32), plist,
                                          np.asarray(states, np.uint64),
                                          [np.asarray(h, np.int32) for h in histories])
    return np.asarray(toks), np.asarray(new_states)


def random_logits(rng, n, V, ties=True):
    x = rng.normal(0, 3, size=(n, V)).astype(np.float32)
    if ties:  # exact ties, -0/+0, NaN and infinities, as real rows can have
        x[:, 5:9] = x[:, 4:5]
        x[:, 10] = -0.0
        x[:, 11] = 0.0
        x[::3, 12] = np.nan
        x[1::4, 13] = -np.inf
        x[2::7, 14] = np.inf
    return x


def test_greedy_identical(tmp_path):
    rng = np.random.default_rng(1)
    V = 5003
    x = random_logits(rng, 24, V)
    plist, hist = [], []
    for r in range(24):
        pen = r % 3 == 1
        plist.append(params(temperature=0.0, repetition_penalty=1.3 if pen else 1.0,
                            frequency_penalty=0.5 if pen else 0.0, presence_penalty=-0.4 if r % 5 == 0 else 0.0))
        hist.append(rng.integers(0, V, size=int(rng.integers(0, 90))))
    states = rng.integers(0, 2**63, size=24, dtype=np.uint64)
    toks, st = gpu_sample(x, plist, states, hist)
    for r in range(24):
        want, want_st = cpu_sample(x[r], plist[r], states[r], hist[r])
        assert toks[r] == want, r
        assert st[r] == states[r] == want_st  # greedy does not advance the generator


@pytest.mark.parametrize("V", [3001, 151936])
def test_seeded_draws_match_cpu(V):
    rng = np.random.default_rng(V)
    n = 256 if V < 10000 else 48
    x = random_logits(rng, n, V)
    x[: n // 2] *= 2.5  # peaked rows beside flat ones
    choices = [
        dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.7),
        dict(top_k=1, top_p=1.0, min_p=0.0, temperature=1.0),
        dict(top_k=1024, top_p=0.9, min_p=0.0, temperature=1.3),
        dict(top_k=7, top_p=0.5, min_p=0.3, temperature=0.4),
        dict(top_k=0, top_p=1.0, min_p=0.05, temperature=1.0),
        dict(top_k=0, top_p=1.0, min_p=0.0, temperature=0.9),
        dict(top_k=40, top_p=1.0, min_p=0.0, temperature=2.0, repetition_penalty=1.2, frequency_penalty=0.3,
             presence_penalty=0.2, penalty_last_n=-1),
        dict(top_k=V if V < 10000 else 0, top_p=1.0, min_p=0.1, temperature=0.8),  # top_k >= V: off
    ]
    plist, hist = [], []
    for r in range(n):
        plist.append(params(**choices[r % len(choices)]))
        hist.append(rng.integers(0, V, size=int(rng.integers(0, 300))))
    states = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    toks, st = gpu_sample(x, plist, states, hist)
    diff = []
    for r in range(n):
        want, want_st = cpu_sample(x[r], plist[r], states[r], hist[r])
        assert st[r] == want_st, r  # the same generator stream, advanced once
        if toks[r] != want:
            diff.append((r, int(toks[r]), want))
    assert len(diff) <= max(1, n // 100), diff


def test_unsupported_parameters_are_refused():
    """top_k above 1024, or top_p < 1 without top_k, are not run on the device (the engines
    fall back to the CPU sampler); the test entry says so instead of running them."""
    x = np.zeros((1, 3000), np.float32)
    for p in (params(top_k=2000), params(top_k=0, top_p=0.9)):
        with pytest.raises(ValueError, match="beyond the device sampler"):
            gpu_sample(x, [p], [1], [np.zeros(0, np.int32)])


@pytest.mark.parametrize("cfg", [dict(top_k=50, top_p=0.9, min_p=0.0, temperature=0.8),
                                 dict(top_k=0, top_p=1.0, min_p=0.02, temperature=1.0)])
def test_draw_frequencies_follow_the_chain(cfg):
    rng = np.random.default_rng(7)
    V = 1000
    row = (rng.normal(0, 1.5, size=V)).astype(np.float32)
    probs = chain_probs(row, **cfg)
    N = 20000
    x = np.repeat(row[None, :], N, axis=0)
    states = rng.integers(0, 2**63, size=N, dtype=np.uint64)
    toks, _ = gpu_sample(x, [params(**cfg)] * N, states, [np.zeros(0, np.int32)] * N)
    counts = np.bincount(toks, minlength=V).astype(np.float64)
    assert counts[probs == 0].sum() == 0, "drew a token the chain excludes"
    z = chi_square_z(counts, probs)
    assert z < 3.7, z  # p > 1e-4


# ------------------------------------------------------------------ in the engine
GREEDY_PROMPTS = ["Write a haiku about GPU computing", "def quicksort(arr):", "What is the capital of France?",
                  "Explain what a KV cache is in one sentence.", "1, 1, 2, 3, 5, 8,"]


@pytest.fixture(scope="module")
def real_cpu(real_model_path):
    import orcd
    m = orcd.Model(real_model_path, device="cpu", n_ctx=512)
    yield m
    m.close()


def test_decode_sample_equals_logits_and_cpu_sampler(real_model_path, real_cpu):
    """The engine's device-sampled step against the same step's logits copied to the host
    and the CPU sampler with the same generator state: the same token (rounding of sums
    aside: at most 1 in 40 may differ), the same state after."""
    c = cuda_module()
    eng = c.CudaEngine(real_model_path, 256, 2)
    ids = np.asarray(real_cpu.tokenize("def fib(n):\n    "), np.int32)
    for s in (0, 1):
        eng.forward(s, ids, 0)
    p = params(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1)
    rng = np.random.default_rng(3)
    hist = list(ids)
    tok, diff = int(ids[-1]), 0
    # slot 0 takes the device path, slot 1 the logits path, fed the same tokens
    for step in range(40):
        pos = len(hist) - 1
        state = int(rng.integers(0, 2**63))
        r = eng.decode_sample(0, tok, pos, p, state, np.asarray(hist, np.int32))
        assert r is not None
        logits = eng.forward(1, np.array([tok], np.int32), pos)
        want, want_state = cpu_sample(logits, p, state, hist)
        assert r[1] == want_state
        diff += r[0] != want
        tok = want
        hist.append(tok)
    assert diff <= 1, diff
    # parameters beyond the device sampler: None, nothing evaluated
    assert eng.decode_sample(0, tok, len(hist) - 1, params(top_k=0, top_p=0.5), 1, np.asarray(hist, np.int32)) is None


def test_cuda_step_loop_greedy_equals_cpu(real_model_path, real_cpu):
    """Five prompts at once through the step loop on the GPU (device sampling, batched
    decode) give the CPU's greedy tokens."""
    from orcd.batch import BatchRunner
    from orcd.types import SamplingParams
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [real_cpu.chat_ids([{"role": "user", "content": t}]) for t in GREEDY_PROMPTS]
    want = [real_cpu.generate(q, params=p).token_ids for q in prompts]
    with BatchRunner(real_model_path, device="cuda", n_ctx=512, n_slots=4) as r:
        got = [list(q) for q in [r.submit(q, p) for q in prompts]]
    assert got == want


def test_model_chat_sampled_on_the_device_is_deterministic(real_model_path):
    """Model.chat on the GPU samples on the device: the same seed gives the same tokens,
    and a different seed other ones."""
    import orcd
    with orcd.Model(real_model_path, device="cuda", n_ctx=512) as m:
        msgs = [{"role": "user", "content": "Write a haiku about GPU computing"}]
        kw = dict(max_tokens=40, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05)
        a = m.chat(msgs, seed=11, **kw)
        b = m.chat(msgs, seed=11, **kw)
        c = m.chat(msgs, seed=12, **kw)
    assert a.token_ids == b.token_ids
    assert c.token_ids != a.token_ids


@pytest.mark.parametrize("temperature,top_k", [(0.9, 40), (0.7, 1000), (1.0, 200), (0.0, 40)])
def test_decode_sample_steps_equal_single_steps(real_model_path, real_cpu, temperature, top_k):
    """decode_sample_steps (n steps, each draw fed to the next step on the device) against n
    decode_sample calls on another slot, each given the previous draw: the same tokens and the
    same generator state (the same kernels on the same inputs); temperature 0 is decode_greedy.
    Penalties are refused (None, nothing evaluated)."""
    c = cuda_module()
    eng = c.CudaEngine(real_model_path, 256, 2)
    ids = np.asarray(real_cpu.tokenize("Once upon a time"), np.int32)
    for s in (0, 1):
        eng.forward(s, ids, 0)
    p = params(temperature=temperature, top_k=top_k, top_p=0.95, min_p=0.02)
    n, pos, state = 24, len(ids) - 1, 987654321
    got = eng.decode_sample_steps(0, int(ids[-1]), pos, n, p, state)
    assert got is not None
    toks, st, tok, want = got[0].tolist(), state, int(ids[-1]), []
    for i in range(n):
        r = eng.decode_sample(1, tok, pos + i, p, st, np.asarray(list(ids) + want, np.int32))
        tok, st = r
        want.append(tok)
    assert toks == want and got[1] == st
    if temperature == 0.0:
        assert toks == eng.decode_greedy(1, int(ids[-1]), pos, n).tolist()
    assert eng.decode_sample_steps(0, 1, 5, 4, params(repetition_penalty=1.1), 1) is None
    eng.close()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 40, 0.95), (0.9, 0, 1.0), (0.0, 40, 0.95)])
def test_sampled_step_graphs_equal_plain_launches(real_model_path, real_cpu, temperature, top_k, top_p):
    """set_options(sample_graphs=True): decode_sample_steps replays 8 sampled steps (the fused
    step, the sampler, the feed) from one captured graph. Against the same calls with it off:
    the same tokens and generator states, for a split-sampler row (top_k 40), a one-block row
    (top_k off) and greedy, for 24 steps (three graphs) and 13 (one graph, then single steps),
    and across the attention's one-block -> cluster boundary (direct_keys 512)."""
    c = cuda_module()
    eng = c.CudaEngine(real_model_path, 1024, 2)
    ids = np.asarray(real_cpu.tokenize("Once upon a time"), np.int32)
    p = params(temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.02)
    long_ids = np.resize(ids, 505)
    results = {}
    for on in (False, True):
        paths = eng.set_options(sample_graphs=on)
        assert paths["sample_graphs"] == on
        out = []
        for prompt, n in ((ids, 24), (ids, 13), (long_ids, 24)):
            eng.forward(0, prompt, 0)
            r = eng.decode_sample_steps(0, int(prompt[-1]), len(prompt) - 1, n, p, 4242)
            assert r is not None
            out.append((r[0].tolist(), r[1]))
        results[on] = out
    assert results[True] == results[False]
    eng.close()


def test_model_chat_blocks_equal_single_steps(real_model_path, monkeypatch):
    """Model.chat takes DEVICE_BLOCK tokens per device call: the same tokens, finish reason and
    text as one token per call, with a stop inside a block (the tokens after it dropped) and with
    max_tokens not a multiple of the block."""
    import orcd
    import orcd.model as om
    short = [{"role": "user", "content": "Name three colors, one word each."}]
    long = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    kw = dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=5)
    cases = [(short, 200), (long, 13)]
    with orcd.Model(real_model_path, device="cuda", n_ctx=512) as m:
        a = [m.chat(msgs, max_tokens=mt, **kw) for msgs, mt in cases]
        monkeypatch.setattr(om, "DEVICE_BLOCK", 1)
        b = [m.chat(msgs, max_tokens=mt, **kw) for msgs, mt in cases]
    for x, y in zip(a, b):
        assert (x.token_ids, x.finish_reason, x.text) == (y.token_ids, y.finish_reason, y.text)
    assert a[0].finish_reason == "stop"  # a short answer: the end-of-turn token inside some block
    assert a[1].finish_reason == "length" and len(a[1].token_ids) == 13


# ------------------------------------------------------------------ split sampler, warp path
def _stress_rows(rng, n, V):
    """Rows that stress the split sampler's top_k selection: ties everywhere (a few distinct
    values), all equal, one finite logit, sorted runs (every batch of the slice kernel enters the
    top-64), the maximum in several slices, NaN and infinities."""
    x = rng.normal(0, 3, size=(n, V)).astype(np.float32)
    for r in range(n):
        kind = r % 8
        if kind == 1:    # a few distinct values: ties at the k-th logit across slices
            x[r] = rng.integers(-3, 3, size=V).astype(np.float32)
        elif kind == 2:  # all equal
            x[r] = 0.5
        elif kind == 3:  # a single finite logit, NaN elsewhere
            x[r] = np.nan
            x[r, int(rng.integers(0, V))] = -2.0
        elif kind == 4:  # ascending: each new batch beats the running top-64
            x[r] = np.linspace(-5, 5, V, dtype=np.float32)
        elif kind == 5:  # descending
            x[r] = np.linspace(5, -5, V, dtype=np.float32)
        elif kind == 6:  # infinities, -0/+0, NaN, the maximum repeated in several slices
            x[r, ::97] = np.inf
            x[r, 1::89] = -np.inf
            x[r, 2::83] = np.nan
            x[r, 3::79] = -0.0
        elif kind == 7:  # fewer finite logits than top_k
            x[r] = -np.inf
            x[r, rng.integers(0, V, size=5)] = rng.normal(0, 1, size=5).astype(np.float32)
    return x


@pytest.mark.parametrize("V", [151936, 4096, 5000, 12289, 1025, 70])
@pytest.mark.parametrize("top_k", [1, 2, 40, 64, 65, 1024])
def test_split_sampler_equals_one_block_stress(V, top_k):
    """The split sampler (warp path for top_k <= 64, radix path above) against the one-block
    kernel: the same tokens and generator states bit for bit, with penalties on some rows."""
    if top_k >= V:
        top_k = V - 1
    rng = np.random.default_rng(V * 1000 + top_k)
    n = 48
    x = _stress_rows(rng, n, V)
    cfgs = [
        dict(top_p=0.95, min_p=0.05, temperature=0.7),
        dict(top_p=1.0, min_p=0.0, temperature=1.0),
        dict(top_p=0.5, min_p=0.3, temperature=0.4),
        dict(top_p=0.9, min_p=0.0, temperature=1.7, repetition_penalty=1.3, frequency_penalty=0.4,
             presence_penalty=-0.3, penalty_last_n=-1),
        dict(top_p=0.999, min_p=0.01, temperature=0.05, repetition_penalty=0.8, penalty_last_n=32),
        dict(top_p=0.3, min_p=0.0, temperature=3.0),
    ]
    plist, hist = [], []
    for r in range(n):
        plist.append(params(top_k=top_k, **cfgs[(r // 8 + r) % len(cfgs)]))
        hist.append(rng.integers(0, V, size=int(rng.integers(0, 200))).astype(np.int32))
    states = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    c = cuda_module()
    args = (np.ascontiguousarray(x), plist, states, hist)
    t1, s1 = c.test_sample_rows(*args, split=True)
    t0, s0 = c.test_sample_rows(*args, split=False)
    t1, t0 = np.asarray(t1), np.asarray(t0)
    bad = np.nonzero(t1 != t0)[0]
    assert bad.size == 0, [(int(r), int(t1[r]), int(t0[r]), plist[r]) for r in bad[:5]]
    assert np.array_equal(np.asarray(s1), np.asarray(s0))
    for r in range(3, n, 8):  # the single finite logit (penalties keep it finite) is the only draw
        assert t0[r] == int(np.nonzero(np.isfinite(x[r]))[0][0]), r
