"""The C++ step loop (cpp/step_loop.h, orcd._orcd.StepLoop): many sequences generated
on a C++ thread, requests joining and leaving at any step.

The reference for every sequence is the same request run alone through the engine's
single-sequence path (orcd.Model.generate on the CPU engine, the same sampler chain and
seed): greedy and seeded-sampled tokens must be identical, whatever else is in the batch,
however the prompt is cut into chunks, whichever slot (and cached prefix) it lands in.
Every request ends with exactly one terminal event.
"""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

import orcd
from orcd import _orcd

GREEDY = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=0)


def submit(loop, rid, ids, max_tokens, stop_ids=(), mask_fn=None, **sampling):
    s = dict(GREEDY, **sampling)
    return loop.submit(rid, np.asarray(ids, np.int32), max_tokens, list(stop_ids), s["temperature"], s["top_k"],
                       s["top_p"], s["min_p"], s["repetition_penalty"], s["presence_penalty"],
                       s["frequency_penalty"], s["penalty_last_n"], s["seed"], mask_fn=mask_fn)


def drain(loop, ids, timeout=120.0):
    """{id: (tokens, finish, message)} once every id has its terminal event; asserts one each."""
    toks = {i: [] for i in ids}
    ends = {}
    t0 = time.time()
    while len(ends) < len(ids):
        assert time.time() - t0 < timeout, f"no terminal event for {set(ids) - set(ends)}"
        for rid, tok, fin, msg in loop.take_events(200):
            assert rid not in ends, f"event after the terminal event of {rid}"
            if tok >= 0:
                toks[rid].append(tok)
            if fin:
                ends[rid] = (fin, msg)
    return {i: (toks[i], *ends[i]) for i in ids}


def alone(model, ids, max_tokens, **sampling):
    s = dict(GREEDY, **sampling)
    return model.generate(list(ids), max_tokens=max_tokens, ignore_eos=True, **s).token_ids


@pytest.fixture(scope="module")
def tiny(tiny_model):
    path = tiny_model("Q8_0")
    model = orcd.Model(path, device="cpu", n_ctx=96)
    yield path, model
    model.close()


def prompts_for(n, seed=0, lo=1, hi=40, vocab=200):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("n_slots,chunk", [(1, 512), (3, 7), (8, 16)])
def test_batch_greedy_equals_alone(tiny, n_slots, chunk):
    path, model = tiny
    prompts = prompts_for(10, seed=n_slots)
    want = [alone(model, p, 12) for p in prompts]
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=n_slots, prefill_chunk=chunk)
    for i, p in enumerate(prompts):
        assert submit(loop, i, p, 12)
    got = drain(loop, list(range(len(prompts))))
    for i in range(len(prompts)):
        assert got[i][1] == "length"
        assert got[i][0] == want[i], f"request {i} (prompt {len(prompts[i])} tokens)"
    st = loop.stats()
    assert st["running"] == 0 and st["waiting"] == 0 and st["finished"] == len(prompts)
    loop.close()


def test_batch_sampled_seeds_equal_alone(tiny):
    path, model = tiny
    prompts = prompts_for(6, seed=11)
    kw = [dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=100 + i,
               repetition_penalty=1.1 if i % 2 else 1.0, frequency_penalty=0.3 if i % 3 == 0 else 0.0)
          for i in range(len(prompts))]
    want = [alone(model, p, 10, **k) for p, k in zip(prompts, kw)]
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=4, prefill_chunk=9)
    for i, p in enumerate(prompts):
        assert submit(loop, i, p, 10, **kw[i])
    got = drain(loop, list(range(len(prompts))))
    assert [got[i][0] for i in range(len(prompts))] == want
    loop.close()


@pytest.fixture(scope="module")
def real(real_model_path):
    model = orcd.Model(real_model_path, device="cpu", n_ctx=256)
    yield real_model_path, model
    model.close()


def test_joins_at_any_step_and_cancel_leaves_others_unchanged(real):
    """The real model (a step takes tens of ms on the CPU, so the cancel lands mid-generation)."""
    path, model = real
    prompts = [model.tokenize(t) for t in ("def fib(n):", "The capital of France is", "1, 1, 2, 3, 5,",
                                           "import numpy as np")]
    n_new = 16
    want = [alone(model, p, n_new) for p in prompts]
    loop = _orcd.StepLoop(path, n_ctx=256, n_slots=4, prefill_chunk=5)
    assert submit(loop, 0, prompts[0], n_new)
    assert submit(loop, 1, prompts[1], n_new)
    seen = {0: [], 1: []}
    # the others join while 0 and 1 are generating; 2 is cancelled part-way
    ends = {}
    submitted = 2
    cancelled_at = None
    t0 = time.time()
    while len(ends) < len(prompts):
        assert time.time() - t0 < 120
        for rid, tok, fin, msg in loop.take_events(100):
            assert rid not in ends
            if tok >= 0:
                seen.setdefault(rid, []).append(tok)
            if fin:
                ends[rid] = fin
        if submitted < len(prompts) and len(seen[0]) >= 2 * (submitted - 1):
            assert submit(loop, submitted, prompts[submitted], n_new)
            seen.setdefault(submitted, [])
            submitted += 1
        if cancelled_at is None and len(seen.get(2, [])) >= 2:
            assert loop.cancel(2)
            cancelled_at = len(seen[2])
    assert ends[2] == "cancelled" and len(seen[2]) < n_new
    assert seen[2] == want[2][: len(seen[2])]  # what it produced before the cancel was right
    for i in (0, 1, 3):
        assert ends[i] == "length" and seen[i] == want[i], i
    assert not loop.cancel(2)  # gone
    assert loop.stats()["running"] == 0
    loop.close()


def test_stop_ids_end_without_emitting(tiny):
    path, model = tiny
    p = prompts_for(1, seed=2)[0]
    ref = alone(model, p, 12)
    stop = ref[4]
    first = ref.index(stop)
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=2)
    submit(loop, 7, p, 12, stop_ids=[stop])
    got = drain(loop, [7])[7]
    assert got[1] == "stop" and got[0] == ref[:first]
    loop.close()


def test_length_capped_by_context(tiny):
    path, model = tiny
    p = prompts_for(1, seed=3, lo=90, hi=90)[0]
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=1)
    submit(loop, 1, p, 100)
    toks, fin, _ = drain(loop, [1])[1]
    assert fin == "length" and len(toks) == 96 - 90
    assert toks == alone(model, p, 6)
    loop.close()


def test_prefix_of_a_finished_request_is_reused(tiny):
    path, model = tiny
    p = prompts_for(1, seed=4, lo=30, hi=30)[0]
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=2)
    submit(loop, 1, p, 4)
    a = drain(loop, [1])[1][0]
    before = loop.stats()["prompt_tokens"]
    assert before == 30
    submit(loop, 2, p + a[:2], 4)  # the first request's prompt and two of its tokens are cached
    b = drain(loop, [2])[2][0]
    assert loop.stats()["prompt_tokens"] - before == 1  # only the last prompt token evaluated
    assert b == alone(model, p + a[:2], 4)
    loop.close()


def test_bad_requests_are_clear_errors(tiny):
    path, _ = tiny
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=1, max_waiting=30)
    with pytest.raises(ValueError, match="prompt is empty"):
        submit(loop, 1, [], 4)
    with pytest.raises(ValueError, match="token id 100000 out of range"):
        submit(loop, 1, [1, 100000], 4)
    with pytest.raises(ValueError, match="does not fit in n_ctx=96"):
        submit(loop, 1, [1] * 96, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        submit(loop, 1, [1], 0)
    with pytest.raises(ValueError, match="top_p"):
        submit(loop, 1, [1], 4, top_p=1.5)
    # 20 requests of 50 steps queue behind one slot: the last one is surely still waiting
    for i in range(1, 21):
        assert submit(loop, i, [1, 2], 50)
    with pytest.raises(ValueError, match="already in use"):
        submit(loop, 20, [1, 2], 4)
    loop.shutdown()
    with pytest.raises(ValueError, match="shut down"):
        submit(loop, 9, [1], 4)
    loop.close()
    with pytest.raises(ValueError, match="closed"):
        loop.stats()


def test_queue_full_is_refused(tiny):
    path, _ = tiny
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=1, max_waiting=0)
    # Request 1 is held before its first token until the gate opens: on a busy machine a
    # request left to run could finish its 80 tokens before the second submit.
    gate = threading.Event()

    def hold(generated, mask):
        mask[:] = 0xFFFFFFFF
        gate.wait(60)

    assert submit(loop, 1, [1, 2, 3], 80, mask_fn=hold)
    try:
        # it takes the only slot or is still waiting for it: either way no second request fits
        assert not submit(loop, 2, [4, 5], 4)
    finally:
        gate.set()  # (also when the assertion fails: the loop thread must not wait out 80 timeouts)
    got = drain(loop, [1])
    assert got[1][1] == "length"
    assert submit(loop, 3, [4, 5], 2)  # free again
    drain(loop, [3])
    loop.close()


def test_shutdown_ends_every_request(tiny):
    path, _ = tiny
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=2, max_waiting=8)
    for i in range(6):
        assert submit(loop, i, [1 + i, 2, 3], 80)
    loop.take_events(50)
    loop.shutdown()
    ends = {}
    for rid, tok, fin, msg in loop.take_events(0):
        if fin:
            assert rid not in ends
            ends[rid] = fin
    # those that ended before the shutdown had their events taken above or here
    assert set(ends) <= set(range(6))
    assert loop.stats()["running"] == 0 and loop.stats()["waiting"] == 0
    loop.close()


def test_random_mix_every_request_terminates_once(tiny):
    """200 requests of random lengths, parameters and cancels from two threads: each gets
    exactly one terminal event and every greedy one equals its lone run."""
    path, model = tiny
    rng = random.Random(42)
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=5, max_waiting=400, prefill_chunk=11)
    reqs = {}
    for i in range(200):
        p = [rng.randrange(200) for _ in range(rng.randint(1, 30))]
        reqs[i] = (p, rng.randint(1, 8), rng.random() < 0.5)
    cancel_ids = set(rng.sample(range(200), 40))

    def producer(ids):
        for i in ids:
            p, n, greedy = reqs[i]
            assert submit(loop, i, p, n, **({} if greedy else dict(temperature=1.0, seed=i)))
            if i in cancel_ids:
                loop.cancel(i)

    threads = [threading.Thread(target=producer, args=(range(k, 200, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = drain(loop, list(range(200)), timeout=300)
    for i, (toks, fin, msg) in got.items():
        p, n, greedy = reqs[i]
        assert fin in ("length", "cancelled"), (i, fin, msg)
        if fin == "length":
            assert len(toks) == n
        if greedy and rng.random() < 0.25:  # a sample of them against the lone run
            assert toks == alone(model, p, n)[: len(toks)], i
    st = loop.stats()
    assert st["finished"] == 200 and st["running"] == 0 and st["waiting"] == 0
    loop.close()


def test_close_while_another_thread_waits(tiny):
    path, _ = tiny
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=1)
    out = []
    t = threading.Thread(target=lambda: out.append(loop.take_events(3000)))
    t.start()
    time.sleep(0.1)
    t0 = time.time()
    loop.close()
    t.join(10)
    assert not t.is_alive() and time.time() - t0 < 1.0  # woken by the shutdown, not the timeout
    assert out == [[]]


# ------------------------------------------------------------------ orcd.batch.BatchRunner
def test_batch_runner_requests_equal_alone(tiny):
    from orcd.batch import BatchRunner, Busy
    from orcd.types import SamplingParams
    path, model = tiny
    prompts = prompts_for(5, seed=21)
    p = SamplingParams(max_tokens=9, temperature=0.7, seed=5)
    want = [model.generate(q, params=p.replace(ignore_eos=True)).token_ids for q in prompts]
    with BatchRunner(path, device="cpu", n_ctx=96, n_slots=2, max_waiting=3) as r:
        reqs = [r.submit(q, p) for q in prompts[:5]]
        assert [list(q) for q in reqs] == want  # iterating yields each request's tokens
        assert all(q.finish_reason == "length" and q.done for q in reqs)
        # a full queue is refused with Busy, not dropped
        long = SamplingParams(max_tokens=80, temperature=0)
        held = [r.submit([1, 2, 3], long) for _ in range(5)]
        with pytest.raises(Busy):
            for _ in range(20):
                held.append(r.submit([1, 2, 3], long))
        for q in held:
            q.cancel()
        assert all(q.wait(30).finish_reason in ("cancelled", "length") for q in held)
        with pytest.raises(ValueError, match="out of range"):
            r.submit([10**6], p)
        with pytest.raises(ValueError, match="max_tokens"):
            r.submit([1], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="closed"):
        r.submit([1], p)


def test_batch_runner_close_ends_live_requests(tiny):
    from orcd.batch import BatchRunner
    from orcd.types import SamplingParams
    path, _ = tiny
    r = BatchRunner(path, device="cpu", n_ctx=96, n_slots=1, max_waiting=10)
    reqs = [r.submit([1 + i, 2], SamplingParams(max_tokens=90, temperature=0)) for i in range(4)]
    r.close()
    assert all(q.wait(10).done for q in reqs)
    assert {q.finish_reason for q in reqs} <= {"cancelled", "length"}
    assert any(q.finish_reason == "cancelled" for q in reqs)
