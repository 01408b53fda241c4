"""Structured output on the CUDA backend (skipped without a usable GPU).

The GPU samples where the logits are (decode_batch_sample), masked rows too: the step loop
computes a masked request's mask (StepRequest.mask_fn) on the host, the engine uploads it and
applies it to the logits next to the sampler (cuda/sample_kernels.cu apply_token_masks_kernel,
whose CPU twin is apply_token_mask in cpp/sampler.cpp); Model's single-sequence path does the
same one token a call (decode_sample's mask). These tests check the kernel against its twin and
NumPy, that the masks hold on the GPU engines with no row's logits copied to the host, that a
masked greedy request picks NumPy's argmax over the allowed tokens of the engine's logits (within
GPU rounding), that a masked device draw is the CPU sampler's draw on the masked host logits, and
that JSON-schema outputs validate on the real model. Run: python -m pytest tests/test_cuda_structured.py -q
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import orcd
from orcd.backend import cuda_available, cuda_module, cuda_status

pytestmark = pytest.mark.skipif(not cuda_available(), reason=f"no usable CUDA GPU: {cuda_status()}")

from test_structured import RANDOM, SCHEMA, FixedMask, drain, mask_emptied_mid_stream, mask_of, submit  # noqa: E402
from test_cuda_sampling import cpu_sample, params  # noqa: E402


def test_mask_kernel_matches_its_cpu_twin():
    """apply_token_masks_kernel on rows of random logits (n_vocab not a multiple of 32) with
    masks of every kind of word (all set, none set, mixed): NumPy's bit-by-bit masking, and
    the CPU twin's result, exactly."""
    from orcd import _orcd
    rng = np.random.default_rng(7)
    V, n = 1000, 4
    logits = rng.standard_normal((n, V)).astype(np.float32)
    logits[1, 5] = np.inf  # a non-finite logit passes unless masked
    words = (V + 31) // 32
    masks = rng.integers(0, 2**32, size=(n, words), dtype=np.uint64).astype(np.uint32)
    masks[0, :] = 0xFFFFFFFF
    masks[2, :] = 0
    masks[3, ::3] = 0xFFFFFFFF
    got = cuda_module().test_apply_token_masks(logits, masks)
    for r in range(n):
        bits = np.unpackbits(masks[r].view(np.uint8), bitorder="little")[:V].astype(bool)
        want = np.where(bits, logits[r], -np.inf).astype(np.float32)
        np.testing.assert_array_equal(got[r], want)
        np.testing.assert_array_equal(got[r], _orcd.apply_token_mask(logits[r], masks[r]))
    with pytest.raises(Exception, match="masks must be uint32"):
        cuda_module().test_apply_token_masks(logits, masks[:, :-1].copy())


def test_decode_sample_with_a_mask_is_the_cpu_draw_on_masked_logits(real_model_path):
    """decode_sample with a mask (the device path) against the same step's logits copied to
    the host, masked bit by bit in NumPy, and the CPU sampler with the same generator state:
    every token allowed, the same token (rounding of sums aside: at most 1 in 30), the same
    state after; greedy identical to NumPy's argmax over the allowed logits."""
    import orcd
    c = cuda_module()
    with orcd.Model(real_model_path, device="cpu", n_ctx=64) as m:
        ids = np.asarray(m.tokenize("def fib(n):\n    "), np.int32)
    eng = c.CudaEngine(real_model_path, 256, 2)
    V = eng.n_vocab
    for s in (0, 1):
        eng.forward(s, ids, 0)
    rng = np.random.default_rng(5)
    hist, tok, diff = list(ids), int(ids[-1]), 0
    for step in range(30):
        pos = len(hist) - 1
        logits = eng.forward(1, np.array([tok], np.int32), pos)
        # a random tenth of the vocabulary, with the model's favourite in it every other step
        allowed = set(rng.choice(V, V // 10, replace=False).tolist())
        if step % 2 == 0:
            allowed.add(int(np.argmax(logits)))
        mask = mask_of(allowed, V)
        masked = logits.copy()
        masked[np.array(sorted(set(range(V)) - allowed))] = -np.inf
        greedy = step % 3 == 0
        p = params(temperature=0.0) if greedy else params(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05)
        state = int(rng.integers(0, 2**63))
        r = eng.decode_sample(0, tok, pos, p, state, np.asarray(hist, np.int32), mask=mask)
        assert r is not None and r[0] in allowed, (step, r)
        want, want_state = cpu_sample(masked, p, state, hist)
        if greedy:
            assert r[0] == int(np.argmax(masked)), step
        assert r[1] == want_state
        diff += r[0] != want
        tok = want
        hist.append(tok)
    assert diff <= 1, diff
    with pytest.raises(Exception, match="mask must be uint32"):
        eng.decode_sample(0, tok, len(hist) - 1, params(), 1, np.asarray(hist, np.int32), mask=mask[:-1].copy())


@pytest.fixture(scope="module")
def tiny_cuda(tiny_model):
    path = tiny_model("Q8_0")
    model = orcd.Model(path, device="cuda", n_ctx=96)
    loop = cuda_module().CudaStepLoop(path, n_ctx=96, n_slots=4)
    yield path, model, loop
    loop.close()
    model.close()


def test_cuda_step_loop_masks_hold(tiny_cuda):
    _, model, loop = tiny_cuda
    V = loop.n_vocab
    allowed = set(range(50, 90, 2))
    prompt = [1, 2, 3, 4]
    for rid in (1, 2):
        assert submit(loop, rid, prompt, 16, mask_fn=FixedMask(allowed, V), **dict(RANDOM, seed=rid))
    assert submit(loop, 3, prompt, 16, **dict(RANDOM, seed=1))  # unmasked, in the same steps
    assert submit(loop, 4, prompt, 8, mask_fn=FixedMask(range(100, 140, 3), V))  # greedy
    before = loop.stats()["host_sampled"]
    out = drain(loop, [1, 2, 3, 4])
    # every decode row, masked or not, was sampled on the device: no logits came to the host
    assert loop.stats()["host_sampled"] == before, loop.stats()
    for rid in (1, 2):
        assert out[rid][1] == "length" and set(out[rid][0]) <= allowed, out[rid]
    assert out[3][1] == "length" and not set(out[3][0]) <= allowed
    # greedy over the allowed set: each token is the best allowed one of the engine's logits
    # (up to the rounding between the GPU's prompt and decode paths)
    a, toks = np.arange(100, 140, 3), out[4][0]
    for k, t in enumerate(toks):
        row = model.logits(prompt + toks[:k])[-1]
        assert t in set(a.tolist()) and row[t] >= row[a].max() - 1e-2


def test_cuda_step_loop_empty_mask_ends_only_its_request(tiny_cuda):
    """On the device sampler too, a constrained row with nothing to draw ends its own request
    (a clear error) and not the step it shares with others."""
    mask_emptied_mid_stream(tiny_cuda[2])


def test_cuda_model_json_schema(real_model_path):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "Invent a person: name, age and pet, as JSON."}]
    with orcd.Model(real_model_path, device="cuda", n_ctx=512) as llm:
        for seed in range(10):
            d = llm.create_chat_completion(msgs, max_tokens=48, seed=seed, response_format=rf, temperature=1.0,
                                           top_k=0, top_p=1.0, min_p=0.0)
            ch = d["choices"][0]
            assert ch["finish_reason"] == "stop"
            jsonschema.validate(json.loads(ch["message"]["content"]), SCHEMA)
