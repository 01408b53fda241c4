"""One Model shared by threads and by interleaved streams: every call gets the
tokens it gets when it runs alone (greedy and seeded sampling), whatever the
interleaving, with one slot (turns, re-evaluating) or several (a slot each)."""
import random
import sys
import threading
import time

import pytest

import orcd

KW = dict(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture
def fast_switching():
    """Thread switches every microsecond, so the threads interleave within each call."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def run_threads(fn, n):
    errors = []

    def wrap(k):
        try:
            fn(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=wrap, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in ts)


@pytest.mark.parametrize("n_slots", [1, 2])
def test_threads_generate_like_alone(tiny_model, fast_switching, n_slots):
    """4 threads x 3 generate calls with different prompts; each thread sleeps a moment
    between its stream's pieces so the others use the model (and its slots) meanwhile."""
    with orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=128, n_slots=n_slots) as m:
        prompts = [[5 + i, 9 + i, 30 + 2 * i, 17] for i in range(12)]
        alone = [m.generate(p, **KW).text for p in prompts]
        got = [None] * 12

        def work(k):
            for j in range(3):
                i = k * 3 + j
                if j == 1:
                    got[i] = m.generate(prompts[i], **KW).text
                    continue
                parts = []
                for piece in m.stream(prompts[i], **KW):
                    parts.append(piece)
                    time.sleep(0.001)
                got[i] = "".join(parts)

        run_threads(work, 4)
        assert got == alone


@pytest.mark.parametrize("n_slots", [1, 3])
def test_interleaved_streams_in_one_thread(tiny_model, n_slots):
    """Six streams (greedy and seeded sampling, shared prefixes, chat) advanced in a random
    order, with logits() calls in between that overwrite slot 0: each gives what it gives alone."""
    rng = random.Random(1)
    with orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=128, n_slots=n_slots) as m:
        prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, 12))] for _ in range(5)]
        prompts[1] = prompts[0] + [7, 8]
        kws = [dict(max_tokens=16, temperature=t, seed=s, ignore_eos=True)
               for t, s in [(0, 0), (0.9, 1), (0, 0), (1.2, 5), (0.7, 3)]]
        msgs = [{"role": "user", "content": "hello there"}]
        alone = [m.generate(p, **k).text for p, k in zip(prompts, kws)]
        alone_chat = m.chat(msgs, **KW).text
        streams = [m.stream(p, **k) for p, k in zip(prompts, kws)] + [m.stream_chat(msgs, **KW)]
        texts = [[] for _ in streams]
        live = list(range(len(streams)))
        while live:
            i = rng.choice(live)
            try:
                texts[i].append(next(streams[i]))
            except StopIteration:
                live.remove(i)
            if rng.random() < 0.1:
                m.logits([3, 4, 5])
        assert ["".join(t) for t in texts] == alone + [alone_chat]


def test_two_streams_zip(tiny_model):
    """The probe from issue 11: two stream() generators advanced in turn in one thread."""
    with orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=128) as m:
        a_alone = m.generate([10, 20, 30], **KW).text
        b_alone = m.generate([40, 50], **KW).text
        a, b = m.stream([10, 20, 30], **KW), m.stream([40, 50], **KW)
        pa, pb = [], []
        for x, y in zip(a, b):
            pa.append(x)
            pb.append(y)
        pa += list(a)
        pb += list(b)
        assert ("".join(pa), "".join(pb)) == (a_alone, b_alone)


def test_close_while_streaming_is_a_clear_error(tiny_model):
    m = orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=128)
    s = m.stream([10, 20, 30], **KW)
    next(s)
    m.close()
    with pytest.raises(ValueError, match="closed"):
        list(s)


def test_real_model_threads_and_streams(real_model_path):
    """The real model: two threads and two interleaved streams, greedy, a few tokens each."""
    kw = dict(max_tokens=6, temperature=0)
    prompts = ["def add(a, b):", "The capital of France is", "1, 2, 3,", "Hello, my name"]
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as m:
        alone = [m.generate(p, **kw).text for p in prompts]
        got = [None] * 4

        def work(k):
            parts = []
            for piece in m.stream(prompts[k], **kw):
                parts.append(piece)
                time.sleep(0.005)
            got[k] = "".join(parts)

        run_threads(work, 2)
        a, b = m.stream(prompts[2], **kw), m.stream(prompts[3], **kw)
        pa, pb = [], []
        for x, y in zip(a, b):
            pa.append(x)
            pb.append(y)
        got[2], got[3] = "".join(pa + list(a)), "".join(pb + list(b))
        assert got == alone
