"""The server writes everything one wake produced at once (orcd.server.engine.Generation.poll
decodes a wake's tokens together; follow_batches hands every choice's pieces over together;
the handlers write them in one write). The streams must stay what they were: the same text,
UTF-8 safe pieces, exact stop strings and token counts, one finish chunk per choice, the
usage chunk and [DONE] last.

References: the tokenizer's one-shot decode of the ids and Python string operations (the
Generation tests, on the real model's tokenizer, with the wake boundaries drawn at random);
orcd.Model (its own sampler loop and detokenization) for the streamed choices over HTTP,
read with the official `openai` client and as raw server-sent events (httpx).
"""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from orcd.gguf_file import GGUFFile
from orcd.server.engine import Generation, ServeEngine, follow_batches
from orcd.tokenizer import Tokenizer

TEXT = ("Grüße aus Köln — naïve café, 東京の天気は晴れ。😀🚀 ok\n"
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcödé ✓\n") * 3


class FakeRequest:
    """What Generation reads of orcd.batch.Request: tokens, done, finish_reason, message."""

    def __init__(self):
        self.tokens = []
        self.done = False
        self.finish_reason = None
        self.message = ""
        self.on_event = None
        self.logprobs = None
        self.prompt_logprobs = None
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        return True


@pytest.fixture(scope="module")
def tok(real_model_path):
    with GGUFFile(real_model_path) as g:
        return Tokenizer.from_metadata(g.metadata)


def _engine(tok) -> ServeEngine:
    eng = ServeEngine()
    eng.use_tokenizer(tok)
    return eng


def _run(tok, ids, stops, rng, finish="length"):
    """Feeds ids to one Generation in random wake-sized groups; (pieces, gen, req)."""
    eng = _engine(tok)
    req = FakeRequest()
    gen = Generation(eng, req, 1, stops, asyncio.Event(), 0.0)
    pieces, k = [], 0
    while not gen.ended:
        if k < len(ids):
            n = rng.choice((1, 1, 2, 3, 7, 40))
            req.tokens.extend(ids[k:k + n])
            k += n
        if k >= len(ids):
            req.finish_reason, req.done = finish, True
        text, _ = gen.poll()
        pieces.append(text)
    return pieces, gen, req


def test_wake_sized_decoding_equals_one_shot_decode(tok):
    ids = tok.encode(TEXT)
    # the text's multi-byte characters are split across tokens (what makes UTF-8 safety matter)
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    want = tok.decode(ids)
    for seed in range(20):
        pieces, gen, req = _run(tok, ids, [], random.Random(seed))
        assert "".join(pieces) == want, seed
        assert all("\ufffd" not in p for p in pieces)  # never a partial character
        assert gen.completion_tokens == len(ids) and gen.finish_reason == "length" and not req.cancelled


def test_a_cut_character_at_the_end_is_replaced_once(tok):
    ids = tok.encode(TEXT)
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[:k]))  # ends inside a character
    pieces, gen, _ = _run(tok, ids[:cut], [], random.Random(0))
    assert "".join(pieces) == tok.decode(ids[:cut])


@pytest.mark.parametrize("stops", [["晴れ"], ["fib(n - 1)", "zzz"], ["é, 東", "\n    return"], ["ü"]])
def test_stop_strings_cut_at_the_token_that_completes_them(tok, stops):
    ids = tok.encode(TEXT)
    # reference: the first token count whose decoded prefix contains a stop string
    k_stop = next(k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops))
    prefix = tok.decode(ids[:k_stop])
    want = prefix[:min(prefix.find(s) for s in stops if s in prefix)]
    for seed in range(10):
        pieces, gen, req = _run(tok, ids, stops, random.Random(seed))
        assert "".join(pieces) == want, (seed, stops)
        assert gen.finish_reason == "stop" and req.cancelled
        assert gen.completion_tokens == k_stop


def test_follow_batches_hands_over_every_choice_of_a_wake_in_order(tok):
    ids = tok.encode(TEXT)

    async def main():
        eng = _engine(tok)
        wake = asyncio.Event()
        reqs = [FakeRequest() for _ in range(3)]
        gens = [Generation(eng, r, 1, [], wake, 0.0) for r in reqs]
        lengths = [len(ids), len(ids) // 2, 5]
        got = [[] for _ in gens]
        ended = [0, 0, 0]

        async def feed():
            rng = random.Random(3)
            pos = [0, 0, 0]
            while not all(r.done for r in reqs):
                for i, r in enumerate(reqs):
                    if r.done:
                        continue
                    n = rng.choice((1, 2, 5))
                    r.tokens.extend(ids[pos[i]:min(pos[i] + n, lengths[i])])
                    pos[i] = min(pos[i] + n, lengths[i])
                    if pos[i] == lengths[i]:
                        r.finish_reason, r.done = "length", True
                wake.set()
                await asyncio.sleep(0)

        async def read():
            async for batch in follow_batches(gens, wake):
                assert [i for i, _, _ in batch] == sorted({i for i, _, _ in batch})
                for i, text, end in batch:
                    assert not ended[i]
                    got[i].append(text)
                    ended[i] += end

        await asyncio.gather(feed(), read())
        assert ended == [1, 1, 1]
        for i, n in enumerate(lengths):
            assert "".join(got[i]) == tok.decode(ids[:n])
            assert gens[i].completion_tokens == n

    asyncio.run(main())


# ------------------------------------------------------------------ over HTTP (tiny model server)
@pytest.fixture(scope="module")
def ts():
    """tests/test_server.py: its server harness (skips without httpx / openai / aiohttp)."""
    import test_server

    return test_server


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return tiny_model("Q8_0")


@pytest.fixture(scope="module")
def ref(tiny_path):
    import orcd

    m = orcd.Model(tiny_path, device="cpu", n_ctx=512)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(ts, tiny_path, tmp_path_factory):
    with ts.Server(tiny_path, "--n-ctx", "512", "--max-seqs", "8", log_dir=str(tmp_path_factory.mktemp("logs"))) as s:
        yield s


def test_streamed_choices_equal_the_model_and_end_in_order(ts, server, ref):
    msgs = [{"role": "user", "content": "Write a list of fruits"}]
    sampling = dict(temperature=0.9, top_p=1.0)
    want = [ref.chat(msgs, max_tokens=40, seed=100 + i, top_k=0, min_p=0.0, ignore_eos=True, **sampling)
            for i in range(3)]
    body = dict(model=server.model_id, messages=msgs, n=3, max_tokens=40, seed=100, stream=True,
                stream_options={"include_usage": True}, **sampling)
    # the official client
    texts, finishes, usage = ["", "", ""], [None] * 3, None
    for ch in server.client().chat.completions.create(extra_body={"ignore_eos": True}, **body):
        if ch.usage is not None:
            usage = ch.usage
            assert not ch.choices
            continue
        (c,) = ch.choices
        assert finishes[c.index] is None  # nothing after a choice's finish chunk
        texts[c.index] += c.delta.content or ""
        finishes[c.index] = c.finish_reason
    assert texts == [w.text for w in want]
    assert finishes == ["length"] * 3
    assert usage.completion_tokens == sum(len(w.token_ids) for w in want) == 120
    # the raw events: role chunks first, each a JSON chunk, the usage chunk then [DONE] last
    with ts.httpx.stream("POST", server.url + "/v1/chat/completions", json=dict(body, ignore_eos=True),
                      timeout=60.0) as r:
        assert r.status_code == 200
        events = [d for _, d in ts.sse(r.iter_lines())]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(d) for d in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": ""}] * 3
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 120
    per = ["", "", ""]
    for c in chunks[3:-1]:
        (ch,) = c["choices"]
        per[ch["index"]] += ch["delta"].get("content") or ""
    assert per == [w.text for w in want]
    server.wait_idle()


def test_worker_pieces_with_a_stop_string_equal_the_model(ts, server, ref):
    want = ref.generate("Hello world", max_tokens=60, ignore_eos=True, **ts.GREEDY)
    stop = want.text[25:29]  # a stop string from the middle of the text, perhaps across tokens
    assert len(stop) == 4
    with ts.httpx.stream("POST", server.url + "/execute", timeout=60.0,
                      json={"job_id": "c1", "prompt": "Hello world", "raw": True, "max_tokens": 60,
                            "temperature": 0, "top_k": 0, "stop": [stop], "ignore_eos": True}) as r:
        events = [(e, json.loads(d)) for e, d in ts.sse(r.iter_lines())]
    names = [e for e, _ in events]
    assert names[0] == "started" and names[-1] == "end" and set(names[1:-1]) == {"token"}
    toks = [d for e, d in events if e == "token"]
    assert [d["i"] for d in toks] == list(range(len(toks)))
    assert "".join(d["t"] for d in toks) == want.text[:want.text.find(stop)]
    assert events[-1][1]["finish_reason"] == "stop"
