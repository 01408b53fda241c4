"""Logprobs (cpp/logprobs.h, the step loop's n_logprobs / n_prompt_logprobs, Model's and
the OpenAI shapes' logprobs) against an independent reference: NumPy's log_softmax (in
float64) of the CPU engine's own forward logits for the same tokens.

The distribution is the raw one: log_softmax of the logits before penalties, temperature
and top-k/p, so a sampled request with penalties still reports the raw values.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

import orcd
from orcd import _orcd
from orcd import openai_format as fmt
from orcd.batch import BatchRunner
from orcd.types import SamplingParams

TOL = 1e-4


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_top(row_lp: np.ndarray, n: int):
    """The n best (id, logprob): logprob descending, id ascending on ties."""
    order = np.lexsort((np.arange(row_lp.size), -row_lp))[:n]
    return [(int(i), float(row_lp[i])) for i in order]


def check_entry(lp: float, top, row_lp: np.ndarray, chosen: int, n: int) -> None:
    assert abs(lp - row_lp[chosen]) <= TOL
    ref = ref_top(row_lp, n)
    assert [t for t, _ in top] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(top, ref):
        assert abs(a - b) <= TOL
    assert sum(math.exp(v) for _, v in top) <= 1.0 + 1e-5


# ---------------------------------------------------------------- the CPU reference function
def test_native_logprobs_match_numpy_log_softmax():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 3000)) * 4).astype(np.float32)
    logits[1, 17] = logits[1, 18] = logits[1].max() + 1  # a tie at the top: lower id first
    chosen = np.array([0, 18, 2999, 1234], np.int32)
    out = _orcd.logprobs(logits, chosen, 20)
    ref = log_softmax(logits)
    for r in range(4):
        check_entry(out[r][0], out[r][1], ref[r], int(chosen[r]), 20)
    assert out[1][1][0][0] == 17 and out[1][1][1][0] == 18


def test_native_logprobs_nan_counts_as_minus_inf_and_bounds():
    logits = np.array([[0.0, np.nan, 1.0, -np.inf]], np.float32)
    lp, top = _orcd.logprobs(logits, np.array([1], np.int32), 2)[0]
    ref = log_softmax(np.array([0.0, 1.0]))
    assert lp == -math.inf
    assert [t for t, _ in top] == [2, 0]
    assert abs(top[0][1] - ref[1]) < 1e-6 and abs(top[1][1] - ref[0]) < 1e-6
    with pytest.raises(ValueError, match="top logprobs"):
        _orcd.logprobs(logits, np.array([0], np.int32), 21)
    with pytest.raises(ValueError, match="out of range"):
        _orcd.logprobs(logits, np.array([4], np.int32), 0)
    with pytest.raises(ValueError, match="-inf or NaN"):
        _orcd.logprobs(np.full((1, 3), np.nan, np.float32), np.array([0], np.int32), 1)


def test_n_top_zero_and_larger_than_vocab():
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    lp, top = _orcd.logprobs(logits, np.array([2], np.int32), 0)[0]
    assert top == [] and abs(lp - log_softmax(logits)[0, 2]) < 1e-6
    lp, top = _orcd.logprobs(logits, np.array([2], np.int32), 20)[0]
    assert [t for t, _ in top] == [2, 1, 0]
    assert abs(sum(math.exp(v) for _, v in top) - 1.0) < 1e-5


# ---------------------------------------------------------------- the step loop
@pytest.fixture(scope="module")
def tiny(tiny_model):
    path = tiny_model("Q8_0")
    eng = _orcd.CpuEngine(path, 96, 1)
    yield path, eng
    eng.close()


def submit(loop, rid, ids, max_tokens, n_logprobs=-1, n_prompt_logprobs=-1, **kw):
    s = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0, penalty_last_n=64, seed=0)
    s.update(kw)
    return loop.submit(rid, np.asarray(ids, np.int32), max_tokens, [], s["temperature"], s["top_k"], s["top_p"],
                       s["min_p"], s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"],
                       s["penalty_last_n"], s["seed"], n_logprobs=n_logprobs, n_prompt_logprobs=n_prompt_logprobs)


def drain(loop, ids, timeout=120.0):
    """{id: [event tuples]} once each id has its terminal event."""
    evs = {i: [] for i in ids}
    done = set()
    t0 = time.time()
    while len(done) < len(ids):
        assert time.time() - t0 < timeout
        for ev in loop.take_events(200):
            evs[ev[0]].append(ev)
            if ev[2]:
                done.add(ev[0])
    return evs


def forward_rows(eng, prompt, generated=(), chunk=512):
    """The engine's logits for prompt + generated evaluated as the step loop does: the
    prompt in pieces of `chunk` rows, then one token at a time (the CPU engine's rounding
    depends on how many rows a forward has)."""
    rows = []
    for p0 in range(0, len(prompt), chunk):
        rows.append(eng.forward(0, np.asarray(prompt[p0:p0 + chunk], np.int32), p0, True))
    for k, t in enumerate(generated):
        rows.append(eng.forward(0, np.asarray([t], np.int32), len(prompt) + k, True))
    return np.concatenate(rows)


@pytest.mark.parametrize("sampled", [False, True])
def test_step_loop_logprobs_match_forward_logits(tiny, sampled):
    path, eng = tiny
    prompt = [3, 17, 42, 9, 100, 7]
    kw = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3, seed=5) if sampled else {}
    loop = _orcd.StepLoop(path, 96, 2, 1, 8, 4)  # prefill_chunk 4: the prompt runs in two chunks
    try:
        assert submit(loop, 1, prompt, 6, n_logprobs=5, **kw)
        assert submit(loop, 2, prompt, 6, **kw)  # the same request without logprobs: the same tokens
        evs = drain(loop, [1, 2])
    finally:
        loop.close()
    toks = [e[1] for e in evs[1] if e[1] >= 0]
    assert toks == [e[1] for e in evs[2] if e[1] >= 0]
    assert all(len(e) == 4 for e in evs[2])  # no logprobs asked: the 4-tuple events
    assert len(toks) == 6
    rows = log_softmax(forward_rows(eng, prompt, toks, chunk=4))
    for k, e in enumerate(e for e in evs[1] if e[1] >= 0):
        lp, top = e[4]["logprobs"]
        row = rows[len(prompt) - 1 + k]
        check_entry(lp, top, row, e[1], 5)
        if not sampled:
            assert top[0][0] == e[1]  # greedy picks the top-1


def test_step_loop_prompt_logprobs(tiny):
    path, eng = tiny
    prompt = list(range(5, 5 + 40))  # more than prompt_logprob_rows (32): two forwards
    loop = _orcd.StepLoop(path, 96, 1, 1, 8, 512)
    try:
        # the same prompt first: its cached prefix must not be reused for prompt logprobs
        assert submit(loop, 1, prompt, 1)
        drain(loop, [1])
        assert submit(loop, 2, prompt, 2, n_logprobs=0, n_prompt_logprobs=3)
        evs = drain(loop, [2])
    finally:
        loop.close()
    first = evs[2][0]
    plp = first[4]["prompt_logprobs"]
    assert len(plp) == len(prompt) - 1
    rows = log_softmax(forward_rows(eng, prompt, chunk=32))  # prompt_logprob_rows a forward
    for j, (lp, top) in enumerate(plp):
        check_entry(lp, top, rows[j], prompt[j + 1], 3)
    assert all("prompt_logprobs" not in e[4] for e in evs[2][1:] if len(e) > 4)


def test_step_loop_rejects_bad_logprob_counts(tiny):
    path, _ = tiny
    loop = _orcd.StepLoop(path, 96, 1, 1, 8, 512)
    try:
        with pytest.raises(ValueError, match="n_logprobs"):
            submit(loop, 1, [1, 2], 2, n_logprobs=21)
        with pytest.raises(ValueError, match="n_prompt_logprobs"):
            submit(loop, 1, [1, 2], 2, n_prompt_logprobs=-2)
    finally:
        loop.close()


def test_batch_runner_logprobs(tiny):
    path, eng = tiny
    prompt = [11, 12, 13]
    with BatchRunner(path, device="cpu", n_ctx=96, n_slots=2) as r:
        req = r.submit(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=1))
        toks = list(req)
    assert req.prompt_logprobs[0] is None and len(req.prompt_logprobs) == len(prompt)
    rows = log_softmax(forward_rows(eng, prompt, toks))
    for k, e in enumerate(req.logprobs):
        assert e.token_id == toks[k]
        check_entry(e.logprob, e.top, rows[len(prompt) - 1 + k], toks[k], 2)
    for j, e in enumerate(req.prompt_logprobs[1:]):
        check_entry(e.logprob, e.top, rows[j], prompt[j + 1], 1)


# ---------------------------------------------------------------- Model and the OpenAI shapes
@pytest.fixture(scope="module")
def model(tiny_model):
    m = orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=96)
    yield m
    m.close()


def test_generate_logprobs_and_prompt_logprobs(model, tiny):
    prompt = [20, 21, 22, 23]
    out = model.generate(prompt, max_tokens=5, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0,
                         presence_penalty=1.5, seed=3, ignore_eos=True, logprobs=4, prompt_logprobs=2)
    assert len(out.logprobs) == len(out.token_ids) == 5
    rows = log_softmax(forward_rows(tiny[1], prompt, out.token_ids))
    for k, e in enumerate(out.logprobs):
        assert e.token_id == out.token_ids[k]
        check_entry(e.logprob, e.top, rows[len(prompt) - 1 + k], out.token_ids[k], 4)
    assert out.prompt_logprobs[0] is None
    for j, e in enumerate(out.prompt_logprobs[1:]):
        check_entry(e.logprob, e.top, rows[j], prompt[j + 1], 2)
    plain = model.generate(prompt, max_tokens=5, temperature=0.7, top_k=0, top_p=1.0, min_p=0.0,
                           presence_penalty=1.5, seed=3, ignore_eos=True)
    assert plain.token_ids == out.token_ids and plain.logprobs is None
    s = model.stream(prompt, max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)
    list(s)
    assert [e.token_id for e in s.logprobs] == s.token_ids
    assert all(e.top[0][0] == e.token_id for e in s.logprobs)  # greedy: the chosen token is the top-1
    with pytest.raises(ValueError, match="logprobs"):
        model.generate(prompt, max_tokens=1, logprobs=21)


def test_generate_batch_logprobs_equal_generate(model):
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3)
    outs = model.generate([[30, 31, 32], [40, 41]], params=p)
    for ids, out in zip([[30, 31, 32], [40, 41]], outs):
        alone = model.generate(ids, params=p)
        assert out.token_ids == alone.token_ids
        for a, b in zip(out.logprobs, alone.logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= TOL
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_create_completion_logprobs_and_echo(model, tiny):
    prompt = [50, 51, 52, 53]
    r = model.create_completion(prompt, max_tokens=3, temperature=0, logprobs=2, echo=True)
    c = r["choices"][0]
    lp = c["logprobs"]
    n = len(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == n + r["usage"]["completion_tokens"]
    text = model.detokenize(prompt)
    assert c["text"].startswith(text)
    # text_offset: where each token's text starts in the choice's text
    for tok_text, off in zip(lp["tokens"], lp["text_offset"]):
        assert c["text"][off:off + len(tok_text)] == tok_text
    gen = model.generate(prompt, max_tokens=3, temperature=0, logprobs=2)
    rows = log_softmax(forward_rows(tiny[1], prompt, gen.token_ids))
    for j in range(1, n):
        assert abs(lp["token_logprobs"][j] - rows[j - 1][prompt[j]]) <= TOL
    for k, t in enumerate(gen.token_ids):
        assert abs(lp["token_logprobs"][n + k] - rows[n - 1 + k][t]) <= TOL
        top = lp["top_logprobs"][n + k]
        assert len(top) <= 3 and lp["tokens"][n + k] in top  # the top 2 and the chosen token
    plain = model.create_completion(prompt, max_tokens=3, temperature=0)
    assert plain["choices"][0]["logprobs"] is None


def test_create_chat_completion_logprobs_streamed_and_not(model, tiny):
    msgs = [{"role": "user", "content": "hi"}]
    r = model.create_chat_completion(msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    ids = model.chat_ids(msgs)
    gen = model.chat(msgs, max_tokens=4, temperature=0)
    rows = log_softmax(forward_rows(tiny[1], ids, gen.token_ids))
    for k, (e, t) in enumerate(zip(content, gen.token_ids)):
        raw = model.tokenizer.token_to_bytes(t)
        assert e["bytes"] == list(raw) and e["token"] == raw.decode("utf-8", errors="replace")
        assert abs(e["logprob"] - rows[len(ids) - 1 + k][t]) <= TOL
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["token"] == e["token"]
    chunks = list(model.create_chat_completion(msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                               stream=True))
    streamed = [x for c in chunks for x in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert [(x["token"], x["logprob"]) for x in streamed] == [(x["token"], x["logprob"]) for x in content]
    with pytest.raises(ValueError, match="top_logprobs"):
        model.create_chat_completion(msgs, max_tokens=1, top_logprobs=2)


def test_streamed_completion_logprobs_and_echo(model):
    prompt = [60, 61, 62]
    chunks = list(model.create_completion(prompt, max_tokens=4, temperature=0, logprobs=1, echo=True,
                                          stream=True))
    whole = model.create_completion(prompt, max_tokens=4, temperature=0, logprobs=1, echo=True)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == whole["choices"][0]["text"]
    merged = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        if lp:
            for k in merged:
                merged[k] += lp[k]
    want = whole["choices"][0]["logprobs"]
    assert merged["tokens"] == want["tokens"] and merged["text_offset"] == want["text_offset"]
    assert np.allclose([x if x is not None else 0 for x in merged["token_logprobs"]],
                       [x if x is not None else 0 for x in want["token_logprobs"]], atol=TOL)


def test_token_piece_keeps_partial_utf8_bytes():
    class Tok:
        def token_to_bytes(self, t):
            return {1: "é".encode()[:1], 2: b"ab"}[t]

    text, raw = fmt.token_piece(Tok(), 1)
    assert raw == b"\xc3" and text == "\ufffd"
    e = orcd.types.TokenLogprobs(1, -float("inf"), [(2, -0.5)])
    c = fmt.chat_logprobs(Tok(), [e])["content"][0]
    assert c["bytes"] == [0xC3] and c["logprob"] == fmt.LOGPROB_FLOOR
    assert c["top_logprobs"] == [{"token": "ab", "logprob": -0.5, "bytes": [97, 98]}]
