"""Structured output on the CUDA backend (skipped without a usable GPU).

The GPU samples where the logits are (decode_batch_sample); a step with a masked request
(StepRequest.mask_fn) takes the host-logits path instead (decode_batch + the CPU Sampler),
and Model's single-sequence path applies the mask to host logits. These tests check that
the masks hold on the GPU engines, that a masked greedy request picks NumPy's argmax over
the allowed tokens of the engine's logits (within GPU rounding), and that JSON-schema outputs validate on the real
model. Run: python -m pytest tests/test_cuda_structured.py -q
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import orcd
from orcd.backend import cuda_available, cuda_module, cuda_status

pytestmark = pytest.mark.skipif(not cuda_available(), reason=f"no usable CUDA GPU: {cuda_status()}")

from test_structured import RANDOM, SCHEMA, FixedMask, drain, submit  # noqa: E402


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
    out = drain(loop, [1, 2, 3, 4])
    for rid in (1, 2):
        assert out[rid][1] == "length" and set(out[rid][0]) <= allowed, out[rid]
    assert out[3][1] == "length" and not set(out[3][0]) <= allowed
    # greedy over the allowed set: each token is the best allowed one of the engine's logits
    # (up to the rounding between the GPU's prompt and decode paths)
    a, toks = np.arange(100, 140, 3), out[4][0]
    for k, t in enumerate(toks):
        row = model.logits(prompt + toks[:k])[-1]
        assert t in set(a.tolist()) and row[t] >= row[a].max() - 1e-2


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
