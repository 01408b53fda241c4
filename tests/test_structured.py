"""Structured output: the step loop's token-mask hook (cpp/step_loop.h StepRequest.mask_fn)
and orcd.structured (llguidance) through Model.create_completion / create_chat_completion.

References independent of the code under test: for the mask hook, NumPy argmax over the
allowed tokens of Model.logits (the engine's single-sequence path) and plain set membership;
for the constraints, `jsonschema` (validation), `json` (parsing) and Python's `re`
(fullmatch) on the produced texts.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

import orcd
from orcd import _orcd

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

GREEDY = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=0)
RANDOM = dict(GREEDY, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def submit(loop, rid, ids, max_tokens, stop_ids=(), mask_fn=None, **sampling):
    s = dict(GREEDY, **sampling)
    return loop.submit(rid, np.asarray(ids, np.int32), max_tokens, list(stop_ids), s["temperature"], s["top_k"],
                       s["top_p"], s["min_p"], s["repetition_penalty"], s["presence_penalty"],
                       s["frequency_penalty"], s["penalty_last_n"], s["seed"], mask_fn=mask_fn)


from test_step_loop import drain  # noqa: E402  (every id's tokens and its one terminal event)


def mask_of(allowed, n_vocab) -> np.ndarray:
    """The bitmask of a set of token ids, built bit by bit (independent of the code under test)."""
    m = np.zeros((n_vocab + 31) // 32, np.uint32)
    for t in allowed:
        m[t // 32] |= np.uint32(1 << (t % 32))
    return m


class FixedMask:
    """A mask function allowing a fixed set; records the generated tokens it was shown."""

    def __init__(self, allowed, n_vocab):
        self.mask = mask_of(allowed, n_vocab)
        self.seen = []

    def __call__(self, generated, out):
        self.seen.append(list(generated))
        out[:] = self.mask


def test_apply_token_mask_is_bitwise_numpy():
    """The CPU mask (cpp/sampler.cpp apply_token_mask, the GPU kernel's twin) against NumPy's
    unpacked bits: a clear bit sends that token's logit to -inf, a set one keeps it (inf and
    NaN included), bit t % 32 of word t // 32; a mask of the wrong length is refused."""
    rng = np.random.default_rng(11)
    V = 777
    logits = rng.standard_normal(V).astype(np.float32)
    logits[3], logits[40] = np.inf, np.nan
    allowed = set(rng.choice(V, 300, replace=False).tolist()) | {3, 40}
    got = _orcd.apply_token_mask(logits, mask_of(allowed, V))
    for t in range(V):
        if t in allowed:
            assert got[t] == logits[t] or (np.isnan(got[t]) and np.isnan(logits[t])), t
        else:
            assert got[t] == -np.inf, t
    with pytest.raises(ValueError, match="uint32\\[25\\]"):
        _orcd.apply_token_mask(logits, np.zeros(24, np.uint32))


# ------------------------------------------------------------------ the mask hook (tiny model)
@pytest.fixture(scope="module")
def tiny(tiny_model):
    path = tiny_model("Q8_0")
    model = orcd.Model(path, device="cpu", n_ctx=96)
    loop = _orcd.StepLoop(path, n_ctx=96, n_slots=4, n_threads=1)
    yield path, model, loop
    loop.close()
    model.close()


def test_masked_tokens_never_appear(tiny):
    _, model, loop = tiny
    V = loop.n_vocab
    rng = np.random.default_rng(5)
    allowed = set(int(t) for t in rng.choice(np.arange(300), size=12, replace=False))
    prompt = [1, 2, 3, 4, 5]
    masks = {rid: FixedMask(allowed, V) for rid in (1, 2, 3)}
    for rid, m in masks.items():
        assert submit(loop, rid, prompt, 24, mask_fn=m, **dict(RANDOM, seed=rid))
    assert submit(loop, 4, prompt, 24, **dict(RANDOM, seed=1))  # the same seed as 1, unmasked
    out = drain(loop, [1, 2, 3, 4])
    for rid in (1, 2, 3):
        toks, fin, msg = out[rid]
        assert fin == "length" and len(toks) == 24, msg
        assert set(toks) <= allowed, set(toks) - allowed
        # one call per sampled token, each shown exactly the tokens generated before it
        assert masks[rid].seen == [toks[:k] for k in range(24)]
    # without the mask the same seed leaves the set (so the check above can fail)
    assert not set(out[4][0]) <= allowed


def test_masked_greedy_is_argmax_over_allowed(tiny):
    _, model, loop = tiny
    V = loop.n_vocab
    allowed = list(range(40, 140, 3))
    prompt = [7, 8, 9, 10]
    assert submit(loop, 10, prompt, 8, mask_fn=FixedMask(allowed, V))
    toks, fin, msg = drain(loop, [10])[10]
    assert fin == "length", msg
    want, ids = [], list(prompt)
    a = np.asarray(allowed)
    for _ in range(8):
        row = model.logits(ids)[-1]
        t = int(a[np.argmax(row[a])])
        want.append(t)
        ids.append(t)
    assert toks == want


def test_unmasked_requests_beside_masked_ones_are_unchanged(tiny):
    path, model, loop = tiny
    V = loop.n_vocab
    prompt = [11, 12, 13]
    assert submit(loop, 20, prompt, 12, **dict(RANDOM, seed=9))
    assert submit(loop, 21, prompt, 12, mask_fn=FixedMask(range(100, 120), V), **dict(RANDOM, seed=9))
    out = drain(loop, [20, 21])
    alone = model.generate(prompt, max_tokens=12, ignore_eos=True, **dict(RANDOM, seed=9)).token_ids
    assert out[20][0] == alone


def test_mask_fn_errors_end_the_request(tiny):
    _, _, loop = tiny

    def boom(generated, out):
        raise ValueError("no grammar today")

    def nothing(generated, out):
        out[:] = 0

    assert submit(loop, 30, [1, 2], 5, mask_fn=boom)
    assert submit(loop, 31, [1, 2], 5, mask_fn=nothing)
    assert submit(loop, 32, [1, 2], 5)
    out = drain(loop, [30, 31, 32])
    assert out[30][1:] == ("error", "structured output: no grammar today")
    assert out[31][1:] == ("error", "structured output: the constraint allows no token here")
    assert out[32][1] == "length" and len(out[32][0]) == 5
    with pytest.raises(ValueError, match="mask_fn must be callable"):
        submit(loop, 33, [1, 2], 5, mask_fn=3)


class EmptyAfter:
    """Allows a fixed set for the first `n` generated tokens, then nothing."""

    def __init__(self, allowed, n_vocab, n):
        self.mask, self.n = mask_of(allowed, n_vocab), n

    def __call__(self, generated, out):
        out[:] = self.mask if len(generated) < self.n else 0


def mask_emptied_mid_stream(loop):
    """A constrained request whose mask empties after 3 tokens, decoding in the same steps as an
    unconstrained one: it alone ends with the error; the other runs to its length."""
    V = loop.n_vocab
    assert submit(loop, 40, [5, 6, 7], 8, mask_fn=EmptyAfter(range(50, 90), V, 3), **dict(RANDOM, seed=4))
    assert submit(loop, 41, [5, 6, 7], 8, **dict(RANDOM, seed=4))
    out = drain(loop, [40, 41])
    assert out[40][1:] == ("error", "structured output: the constraint allows no token here"), out[40]
    assert len(out[40][0]) == 3 and set(out[40][0]) <= set(range(50, 90))
    assert out[41][1] == "length" and len(out[41][0]) == 8


def test_an_empty_mask_ends_only_its_request(tiny):
    mask_emptied_mid_stream(tiny[2])


def test_tiny_model_regex_through_model_and_batch(tiny):
    """The whole chain on the tiny vocabulary: llguidance's tokenizer from orcd's, the
    matcher, the mask on the single-sequence path and on the step loop (BatchRunner)."""
    from orcd.batch import BatchRunner
    from orcd.structured import structured_spec

    path, model, _ = tiny
    rx = r"(ab|ba)+!"
    for seed in range(3):
        d = model.create_completion("x", max_tokens=30, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                    seed=seed, regex=rx)
        ch = d["choices"][0]
        assert re.fullmatch(rx, ch["text"]) or ch["finish_reason"] == "length", ch
        assert re.fullmatch(r"[ab!]*", ch["text"]), ch
    spec = structured_spec(model.tokenizer, model.n_vocab, regex=rx)
    with BatchRunner(path, device="cpu", n_ctx=96, n_slots=2, n_threads=1) as r:
        reqs = [r.submit(model.tokenize("y"), orcd.SamplingParams(max_tokens=30, seed=s, **{
            k: v for k, v in RANDOM.items() if k != "seed"}), stop_ids=sorted(model.tokenizer.eos_ids),
            mask_fn=spec.new_constraint()) for s in range(3)]
        for req in reqs:
            req.wait(60)
            text = model.detokenize(req.tokens)
            assert req.finish_reason in ("stop", "length"), req.message
            assert re.fullmatch(rx, text) if req.finish_reason == "stop" else re.fullmatch(r"[ab!]*", text)


# ------------------------------------------------------------------ constraints on the real model
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PERSON = [{"role": "user", "content": "Invent a person: name, age and pet, as JSON."}]
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=512) as m:
        yield m


def test_json_schema_outputs_validate(llm, real_model_path):
    """20 samples at temperature 1 through the step loop (BatchRunner, as the server runs
    them), each with its own matcher: every one parses and validates."""
    from orcd.batch import BatchRunner
    from orcd.structured import structured_spec

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    spec = structured_spec(llm.tokenizer, llm.n_vocab, response_format=rf)
    ids = llm.tokenize("A made-up person as JSON with name, age and pet: ")  # short: prefill is most of the time
    n, valid, texts = 20, 0, []
    with BatchRunner(real_model_path, device="cpu", n_ctx=256, n_slots=n, max_waiting=n) as r:
        reqs = [r.submit(ids, orcd.SamplingParams(max_tokens=48, seed=seed, **SAMPLED),
                         stop_ids=sorted(llm.tokenizer.eos_ids), mask_fn=spec.new_constraint())
                for seed in range(n)]
        for req in reqs:
            req.wait(120)
            text = llm.detokenize(req.tokens)
            texts.append(text)
            assert req.finish_reason == "stop", (req.finish_reason, req.message, text)  # the schema bounds it
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
    print(f"\njson_schema validity: {valid}/{n}")
    assert len(set(texts)) > 1  # temperature 1: sampled, not one fixed answer
    # the single-sequence path (Model) too
    d = llm.create_chat_completion(PERSON, max_tokens=48, seed=7, response_format=rf, **SAMPLED)
    assert d["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(d["choices"][0]["message"]["content"]), SCHEMA)


def test_json_object_outputs_parse(llm):
    for seed in range(2):
        d = llm.create_chat_completion([{"role": "user", "content": "A JSON object with one short key."}],
                                       max_tokens=40, seed=seed, response_format={"type": "json_object"},
                                       **SAMPLED)
        ch = d["choices"][0]
        if ch["finish_reason"] == "stop":
            assert isinstance(json.loads(ch["message"]["content"]), dict)
        else:  # cut by max_tokens: a prefix of an object
            assert ch["message"]["content"].lstrip().startswith("{")


def test_regex_outputs_fullmatch(llm):
    rx = r"[0-9]{3}-[0-9]{4}"
    for seed in range(3):
        d = llm.create_completion("A phone number: ", max_tokens=12, seed=seed, regex=rx, **SAMPLED)
        ch = d["choices"][0]
        assert ch["finish_reason"] == "stop" and re.fullmatch(rx, ch["text"]), ch


def test_lark_and_gbnf_grammars(llm):
    q = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    for g in ('start: "yes" | "no"', 'root ::= "yes" | "no"'):
        for seed in range(2):
            d = llm.create_chat_completion(q, max_tokens=5, seed=seed, grammar=g, **SAMPLED)
            assert d["choices"][0]["message"]["content"] in ("yes", "no"), d
            assert d["choices"][0]["finish_reason"] == "stop"


def test_stream_with_a_schema_joins_to_valid_json(llm):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    chunks = list(llm.create_chat_completion(PERSON, max_tokens=48, seed=3, response_format=rf, stream=True,
                                             **SAMPLED))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_bad_constraints_are_refused(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.create_completion("x", regex="[a-")
    with pytest.raises(ValueError, match="response_format"):
        llm.create_completion("x", response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    with pytest.raises(ValueError, match="response_format.type"):
        llm.create_completion("x", response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="grammar"):
        llm.create_completion("x", grammar="start: undefined_rule")
    with pytest.raises(ValueError, match="cannot be combined"):
        llm.create_completion("x", regex="a", grammar='start: "a"')
    with pytest.raises(ValueError, match="ignore_eos"):
        llm.create_completion("x", regex="a", params=orcd.SamplingParams(ignore_eos=True))
    # text is no constraint: the same as no response_format
    a = llm.create_completion("def f(", max_tokens=6, temperature=0, response_format={"type": "text"})
    b = llm.create_completion("def f(", max_tokens=6, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_dropping_a_loop_with_masked_requests_does_not_hang(tiny_model, tmp_path):
    """The loop thread takes the GIL for mask functions: a StepLoop dropped (no close()) while
    such a request runs must stop its thread without waiting for the GIL that the dropping
    thread holds. In a subprocess, so a hang fails the test instead of stalling the suite."""
    import subprocess
    import sys

    path = tiny_model("Q8_0")
    code = f"""
import numpy as np, gc, time
from orcd import _orcd
loop = _orcd.StepLoop({path!r}, n_ctx=96, n_slots=2, n_threads=1)
calls = []
def fn(generated, out):
    calls.append(len(generated))
    time.sleep(0.01)  # the GIL released here: the dropping thread takes it
    out[:] = 0xFFFFFFFF
for rid in (1, 2):
    loop.submit(rid, np.asarray([1, 2, 3], np.int32), 90, [], 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 64, rid, mask_fn=fn)
while len(calls) < 3:
    time.sleep(0.001)
del loop
gc.collect()
print("dropped", len(calls) < 180)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert p.returncode == 0 and "dropped True" in p.stdout, p.stdout + p.stderr
