"""Structured output (token masks) and logprobs together: the masks change which token is
sampled, never the reported logprobs, which stay those of the model's raw distribution.

References independent of the code under test: NumPy's log_softmax (float64) of the CPU
engine's own forward logits for the same tokens (evaluated as the generation evaluates
them: the prompt in one forward, then one token at a time), NumPy argmax over the allowed
tokens for masked greedy picks, `jsonschema` for the JSON.
"""
from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest

import orcd
from orcd import _orcd

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

TOL = 1e-4
GREEDY = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def ref_top(row_lp: np.ndarray, n: int):
    """The n best (id, logprob): logprob descending, id ascending on ties."""
    order = np.lexsort((np.arange(row_lp.size), -row_lp))[:n]
    return [(int(i), float(row_lp[i])) for i in order]


def forward_rows(eng, prompt, generated=()):
    """The engine's logits of every position of prompt + generated (prompt in one forward,
    then one token at a time, as the generation ran)."""
    rows = [eng.forward(0, np.asarray(prompt, np.int32), 0, True)]
    for k, t in enumerate(generated):
        rows.append(eng.forward(0, np.asarray([t], np.int32), len(prompt) + k, True))
    return np.concatenate(rows)


def allowed_of(mask: np.ndarray, n_vocab: int) -> set:
    return {t for t in range(n_vocab) if (int(mask[t // 32]) >> (t % 32)) & 1}


# ------------------------------------------------------------------ Model: json_schema + logprobs
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_with_logprobs_is_valid_json_and_raw_logprobs(real_model_path):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    msgs = [{"role": "user", "content": "Invent a person: name and age, as JSON."}]
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as llm:
        d = llm.create_chat_completion(msgs, max_tokens=40, temperature=0, response_format=rf,
                                       logprobs=True, top_logprobs=5)
        ch = d["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        jsonschema.validate(json.loads(ch["message"]["content"]), SCHEMA)
        content = ch["logprobs"]["content"]
        ids = llm.chat_ids(msgs)
        # the generated ids, from the entries' bytes (each entry is one token)
        text_bytes = b"".join(bytes(e["bytes"]) for e in content)
        assert text_bytes.decode("utf-8") == ch["message"]["content"]
        toks = llm.tokenize(ch["message"]["content"])
        assert [list(llm.tokenizer.token_to_bytes(t)) for t in toks] == [e["bytes"] for e in content]
        from orcd.structured import structured_spec

        constraint = structured_spec(llm.tokenizer, llm.n_vocab, response_format=rf).new_constraint()
        masks = [allowed_of(constraint.mask(toks[:k]), llm.n_vocab) for k in range(len(toks))]
    eng = _orcd.CpuEngine(real_model_path, 256, 2)
    try:
        rows = log_softmax(forward_rows(eng, ids, toks))
    finally:
        eng.close()
    masked_somewhere = False
    for k, (e, t) in enumerate(zip(content, toks)):
        row = rows[len(ids) - 1 + k]
        assert abs(e["logprob"] - row[t]) <= TOL, (k, e["logprob"], row[t])
        ref = ref_top(row, 5)
        got = [(llm.tokenizer.token_to_bytes(i), v) for i, v in ref]
        assert [bytes(x["bytes"]) for x in e["top_logprobs"]] == [b for b, _ in got]
        for x, (_, v) in zip(e["top_logprobs"], got):
            assert abs(x["logprob"] - v) <= TOL
        assert t in masks[k]  # the grammar allowed the pick
        assert t == max(masks[k], key=lambda i: row[i])  # greedy over the allowed tokens
        masked_somewhere |= any(i not in masks[k] for i, _ in ref)
    # the raw top lists name tokens the grammar ruled out: logprobs of the masked
    # distribution would not (so the checks above can fail)
    assert masked_somewhere


# ------------------------------------------------------------------ StepLoop: masked and logprobs rows together
class GatedMask:
    """Allows a fixed set; its first call waits for `go` (so that requests submitted meanwhile
    share the following decode steps) and reports through `called`."""

    def __init__(self, allowed, n_vocab, gate=None):
        self.allowed = set(int(t) for t in allowed)
        self.mask = np.zeros((n_vocab + 31) // 32, np.uint32)
        for t in self.allowed:
            self.mask[t // 32] |= np.uint32(1 << (t % 32))
        self.gate = gate
        self.called = threading.Event()

    def __call__(self, generated, out):
        self.called.set()
        if self.gate is not None:
            self.gate.wait(30)
        out[:] = self.mask


def submit(loop, rid, ids, max_tokens, mask_fn=None, n_logprobs=-1):
    s = GREEDY
    return loop.submit(rid, np.asarray(ids, np.int32), max_tokens, [], s["temperature"], s["top_k"], s["top_p"],
                       s["min_p"], s["repetition_penalty"], s["presence_penalty"], s["frequency_penalty"],
                       s["penalty_last_n"], s["seed"], n_logprobs=n_logprobs, mask_fn=mask_fn)


def drain(loop, ids, timeout=120.0):
    evs = {i: [] for i in ids}
    done = set()
    t0 = time.time()
    while len(done) < len(ids):
        assert time.time() - t0 < timeout, f"no terminal event for {set(ids) - done}"
        for ev in loop.take_events(200):
            evs[ev[0]].append(ev)
            if ev[2]:
                done.add(ev[0])
    return evs


def test_masked_and_logprobs_rows_in_one_step_loop_batch(tiny_model):
    path = tiny_model("Q8_0")
    loop = _orcd.StepLoop(path, 96, 4, 1, 8, 512)
    V = loop.n_vocab
    allowed = list(range(40, 140, 3))
    pa, pb, pc = [7, 8, 9, 10], [21, 22, 23, 24], [31, 5, 60, 2]
    n_new = 8
    gate = threading.Event()
    ma = GatedMask(allowed, V, gate)
    mc = GatedMask(allowed, V)
    try:
        assert submit(loop, 1, pa, n_new, mask_fn=ma)                    # masked, no logprobs
        assert ma.called.wait(30)  # 1 is in the loop, its first mask call holding the step
        assert submit(loop, 2, pb, n_new, n_logprobs=4)                  # unmasked, logprobs
        assert submit(loop, 3, pc, n_new, mask_fn=mc, n_logprobs=4)      # masked, logprobs
        gate.set()
        evs = drain(loop, [1, 2, 3])
        steps = loop.stats()["steps"]
    finally:
        gate.set()
        loop.close()
    for rid in (1, 2, 3):
        assert evs[rid][-1][2] == "length", evs[rid][-1]
    # 2 and 3 were admitted while 1 waited: they decoded in the same steps as 1
    assert steps <= n_new + 3, steps
    assert all(len(e) == 4 for e in evs[1])
    assert all(len(e) == 5 for e in evs[2] + evs[3])
    eng = _orcd.CpuEngine(path, 96, 1)
    try:
        for rid, prompt, masked, with_lp in ((1, pa, True, False), (2, pb, False, True), (3, pc, True, True)):
            toks = [e[1] for e in evs[rid] if e[1] >= 0]
            assert len(toks) == n_new
            rows = forward_rows(eng, prompt, toks)
            lps = log_softmax(rows)
            differs = False
            for k, t in enumerate(toks):
                raw = rows[len(prompt) - 1 + k]
                if masked:
                    a = np.asarray(allowed)
                    assert t == int(a[np.argmax(raw[a])]), (rid, k)
                else:
                    assert t == int(np.argmax(raw)), (rid, k)
                if not with_lp:
                    continue
                lp, top = evs[rid][k][4]["logprobs"]
                row = lps[len(prompt) - 1 + k]
                assert abs(lp - row[t]) <= TOL, (rid, k, lp, row[t])
                ref = ref_top(row, 4)
                assert [i for i, _ in top] == [i for i, _ in ref], (rid, k)
                for (_, x), (_, y) in zip(top, ref):
                    assert abs(x - y) <= TOL
                assert sum(math.exp(v) for _, v in top) <= 1.0 + 1e-5
                differs |= any(i not in ma.allowed for i, _ in top)
            if masked and with_lp:
                assert differs  # the raw top tokens include masked ones: not the masked distribution
    finally:
        eng.close()


# ------------------------------------------------------------------ the same on the GPU (skipped without one)
def test_cuda_masked_and_logprobs_rows_in_one_step_loop_batch(tiny_model):
    """On CudaStepLoop a step with a masked row leaves decode_batch_sample (where the GPU
    computes logprobs) for the host-logits path: the rows there that asked for logprobs get
    them from the host logits. Reference: log_softmax of CudaEngine's forward (GPU rounding:
    0.05, as tests/test_cuda_logprobs.py)."""
    from orcd.backend import cuda_available, cuda_module, cuda_status

    if not cuda_available():
        pytest.skip(f"no usable CUDA GPU: {cuda_status()}")
    path = tiny_model("Q8_0")
    c = cuda_module()
    loop = c.CudaStepLoop(path, 96, 4, 0, 8, 512)
    V = loop.n_vocab
    allowed = list(range(40, 140, 3))
    pa, pb, pc = [7, 8, 9, 10], [21, 22, 23, 24], [31, 5, 60, 2]
    n_new = 8
    gate = threading.Event()
    ma = GatedMask(allowed, V, gate)
    try:
        assert submit(loop, 1, pa, n_new, mask_fn=ma)
        assert ma.called.wait(30)
        assert submit(loop, 2, pb, n_new, n_logprobs=4)
        assert submit(loop, 3, pc, n_new, mask_fn=GatedMask(allowed, V), n_logprobs=4)
        gate.set()
        evs = drain(loop, [1, 2, 3])
    finally:
        gate.set()
        loop.close()
    assert all(len(e) == 4 for e in evs[1])
    assert all(len(e) == 5 for e in evs[2] + evs[3])
    eng = c.CudaEngine(path, 96, 1)
    try:
        for rid, prompt, masked in ((1, pa, True), (2, pb, False), (3, pc, True)):
            assert evs[rid][-1][2] == "length", evs[rid][-1]
            toks = [e[1] for e in evs[rid] if e[1] >= 0]
            rows = log_softmax(eng.forward(0, np.asarray(prompt + toks, np.int32), 0, True))
            for k, t in enumerate(toks):
                row = rows[len(prompt) - 1 + k]
                if masked:
                    assert t in set(allowed) and row[t] >= row[allowed].max() - 0.05, (rid, k)
                if rid == 1:
                    continue
                lp, top = evs[rid][k][4]["logprobs"]
                assert abs(lp - row[t]) <= 0.05, (rid, k, lp, row[t])
                assert len(top) == 4 and sum(math.exp(v) for _, v in top) <= 1 + 1e-5
                for i, v in top:
                    assert abs(v - row[i]) <= 0.05
                assert top[0][1] >= row.max() - 0.05  # the raw best, allowed or not
    finally:
        eng.close()
