"""Logprobs on the GPU (cuda/logprob_kernels.cu) against the CPU reference (cpp/logprobs.h,
orcd._orcd.logprobs) on the same logits, and the CUDA step loop's logprob events (computed
next to the logits in decode_batch_sample) against NumPy's log_softmax of the CUDA
engine's forward logits for the same tokens.

Bounds: on the same logits, the kernel's top ids equal the CPU's exactly (same order:
logprob descending, id ascending) and every value is within 1e-4. The step loop's values
come from batched decode rows while the reference re-evaluates with forward(), whose
rounding differs on the GPU: within 0.05 there, ids compared where the reference's gap
to the next token exceeds that.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from orcd import _orcd
from orcd.backend import cuda_available, cuda_module, cuda_status

pytestmark = pytest.mark.skipif(not cuda_available(), reason=f"no usable CUDA GPU: {cuda_status()}")

from test_logprobs import log_softmax, ref_top  # noqa: E402


def random_logits(rng, n, V):
    x = rng.normal(0, 3, size=(n, V)).astype(np.float32)
    x[:, 5:9] = x[:, 4:5] + 30  # exact ties at the top: lowest id first
    x[::3, 12] = np.nan
    x[1::4, 13] = -np.inf
    x[2::7, 14] = np.inf
    return x


@pytest.mark.parametrize("V", [5003, 151936])
@pytest.mark.parametrize("n_top", [0, 1, 5, 20])
def test_kernel_equals_cpu_reference(V, n_top):
    rng = np.random.default_rng(V + n_top)
    x = random_logits(rng, 9, V)
    chosen = rng.integers(0, V, size=9).astype(np.int32)
    chosen[0] = 13  # a -inf logit
    gpu = cuda_module().test_logprob_rows(x, chosen, n_top)
    cpu = _orcd.logprobs(x, chosen, n_top)
    for (glp, gtop), (clp, ctop) in zip(gpu, cpu):
        assert [t for t, _ in gtop] == [t for t, _ in ctop]
        assert len(gtop) == n_top
        if math.isinf(clp):
            assert glp == clp
        else:
            assert abs(glp - clp) <= max(1e-4, 1e-6 * abs(clp))
        for (_, a), (_, b) in zip(gtop, ctop):
            assert abs(a - b) <= max(1e-4, 1e-6 * abs(b))


def test_kernel_bad_input():
    c = cuda_module()
    x = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="n_top"):
        c.test_logprob_rows(x, np.zeros(1, np.int32), 21)
    with pytest.raises(ValueError, match="-inf or NaN"):
        c.test_logprob_rows(np.full((1, 8), np.nan, np.float32), np.zeros(1, np.int32), 1)


# ---------------------------------------------------------------- the CUDA step loop
def _submit(loop, rid, ids, n, n_logprobs, **kw):
    s = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0, penalty_last_n=64, seed=0)
    s.update(kw)
    assert loop.submit(rid, np.asarray(ids, np.int32), n, [], s["temperature"], s["top_k"], s["top_p"], s["min_p"],
                       s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"], s["penalty_last_n"],
                       s["seed"], n_logprobs=n_logprobs)


def test_cuda_step_loop_logprobs_match_forward(tiny_model):
    path = tiny_model("Q8_0")
    c = cuda_module()
    loop = c.CudaStepLoop(path, 128, 4, 0, 8, 512)
    prompts = {1: [3, 17, 42, 9], 2: [5, 6, 7], 3: [8, 9, 10, 11, 12], 4: [3, 17, 42, 9]}
    sampled = dict(temperature=0.9, top_k=40, top_p=1.0, min_p=0.0, repetition_penalty=1.5, seed=7)
    try:
        _submit(loop, 1, prompts[1], 8, 20)            # greedy, 20 top
        _submit(loop, 2, prompts[2], 8, -1)            # no logprobs, in the same batch
        _submit(loop, 3, prompts[3], 8, 0, **sampled)  # sampled with a penalty: still the raw distribution
        _submit(loop, 4, prompts[4], 8, -1)            # request 1 without logprobs: the same tokens
        evs = {i: [] for i in prompts}
        done, t0 = set(), time.time()
        while len(done) < 4:
            assert time.time() - t0 < 120
            for ev in loop.take_events(200):
                evs[ev[0]].append(ev)
                if ev[2]:
                    done.add(ev[0])
    finally:
        loop.close()
    toks = {i: [e[1] for e in evs[i] if e[1] >= 0] for i in prompts}
    assert toks[1] == toks[4]
    assert all(len(e) == 4 for i in (2, 4) for e in evs[i])
    eng = c.CudaEngine(path, 128, 1)
    try:
        for rid, n_top in ((1, 20), (3, 0)):
            ids = prompts[rid] + toks[rid]
            rows = log_softmax(eng.forward(0, np.asarray(ids, np.int32), 0, True))
            for k, e in enumerate(e for e in evs[rid] if e[1] >= 0):
                lp, top = e[4]["logprobs"]
                row = rows[len(prompts[rid]) - 1 + k]
                assert abs(lp - row[e[1]]) <= 0.05
                assert len(top) == n_top
                assert sum(math.exp(v) for _, v in top) <= 1 + 1e-5
                for j, (t, v) in enumerate(top):
                    assert abs(v - row[t]) <= 0.05
                    ref = ref_top(row, j + 2)
                    # the rank is certain only when both neighbours are clearly apart
                    apart_below = j + 1 < len(ref) and ref[j][1] - ref[j + 1][1] > 0.05
                    apart_above = j == 0 or ref[j - 1][1] - ref[j][1] > 0.05
                    if apart_below and apart_above:
                        assert t == ref[j][0]
                if rid == 1:
                    assert top[0][0] == e[1]  # greedy: the chosen token is the top-1
    finally:
        eng.close()


def test_cuda_model_logprobs(tiny_model):
    """Model on the GPU: decode_sample(..., n_logprobs) computes them next to the logits."""
    import orcd

    with orcd.Model(tiny_model("Q8_0"), device="cuda", n_ctx=128) as m:
        prompt = [20, 21, 22]
        out = m.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
        rows = log_softmax(m.logits(prompt + out.token_ids))
        for k, e in enumerate(out.logprobs):
            assert e.token_id == out.token_ids[k] == e.top[0][0]
            assert abs(e.logprob - rows[len(prompt) - 1 + k][e.token_id]) <= 0.05
        # asking for logprobs does not change a seeded sampled generation
        kw = dict(max_tokens=12, temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, repetition_penalty=1.3, seed=11,
                  ignore_eos=True)
        a = m.generate(prompt, logprobs=5, **kw)
        b = m.generate(prompt, **kw)
        assert a.token_ids == b.token_ids and len(a.logprobs) == 12
        rows = log_softmax(m.logits(prompt + a.token_ids))
        for k, e in enumerate(a.logprobs):
            assert abs(e.logprob - rows[len(prompt) - 1 + k][e.token_id]) <= 0.05


def test_decode_sample_logprobs_equal_cpu_reference_on_its_logits(tiny_model):
    """decode_sample's logprobs against the CPU reference on forward()'s logits for the same
    step (the fused single-sequence path and forward() share the decode kernels)."""
    c = cuda_module()
    path = tiny_model("Q8_0")
    eng = c.CudaEngine(path, 64, 2)
    try:
        ids = np.asarray([4, 5, 6, 7], np.int32)
        greedy = (0.0, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 64)
        eng.forward(0, ids[:3], 0)
        eng.forward(1, ids[:3], 0)
        r = eng.decode_sample(0, int(ids[3]), 3, greedy, 0, ids, 7)
        assert r is not None and len(r) == 3
        tok, _, (lp, top) = r
        logits = eng.forward(1, ids[3:], 3)  # the same step in the other slot, logits to the host
        clp, ctop = _orcd.logprobs(logits.reshape(1, -1), np.asarray([tok], np.int32), 7)[0]
        assert top[0][0] == tok
        assert abs(lp - clp) <= 0.05
        assert sum(math.exp(v) for _, v in top) <= 1 + 1e-5
        assert len(top) == len(ctop) == 7
    finally:
        eng.close()
