"""Model's device-block path (python/orcd/model.py, _run): on the GPU a generation without
logprobs takes DEVICE_BLOCK tokens from one engine call (Engine.decode_sample_steps: each draw
fed to the next step on the device). That bookkeeping (the slot's cached tokens, the generator
state handed from block to block, the block length at the end of max_tokens, a stop or a closed
stream inside a block, two generations at once) is Python, so it is tested here on the CPU
engine with HostBlocks: decode_sample_steps done as the host does a step (a forward, then the
native Sampler, the CPU twin of the device sampler, continuing the given generator state).

The reference is the same Model without HostBlocks: each token a forward and a draw on the
host. Both evaluate the same tokens at the same positions with the same sampler stream, so
the tokens must be identical, not close.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import orcd
from orcd import _orcd


class HostBlocks:
    """The CPU engine with decode_sample_steps (what the CUDA engine adds); everything else
    goes to the engine. Records each block as (position, steps)."""

    def __init__(self, eng):
        self._eng = eng
        self.blocks = []
        self._mu = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._eng, name)

    def decode_sample_steps(self, slot, token, pos, n_steps, params, rng_state):
        T, top_k, top_p, min_p, rep, pres, freq, last_n = params
        if rep != 1.0 or pres != 0.0 or freq != 0.0:
            return None  # as the CUDA engine: penalties need the history on the host
        s = _orcd.Sampler(temperature=T, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep,
                          presence_penalty=pres, frequency_penalty=freq, penalty_last_n=last_n, seed=0)
        s.rng_state = rng_state
        out, t = [], int(token)
        for i in range(n_steps):
            logits = self._eng.forward(slot, np.asarray([t], np.int32), pos + i, False)
            t = int(s.sample(logits, np.zeros(0, np.int32)))
            out.append(t)
        with self._mu:
            self.blocks.append((pos, n_steps))
        return np.asarray(out, np.int32), s.rng_state


SAMPLED = dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02)


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("Q8_0")


def blocked(path, n_slots=1):
    m = orcd.Model(path, device="cpu", n_ctx=128, n_slots=n_slots)
    m._engine = HostBlocks(m._engine)
    m.device = "cuda"  # the gate of the device path in _run; the engine is the CPU one
    return m


@pytest.fixture(scope="module")
def ref(path):
    with orcd.Model(path, device="cpu", n_ctx=128) as m:
        yield m


PROMPTS = [[5, 17, 42, 9], [101, 3, 77, 250, 12, 8, 61], [33]]


@pytest.mark.parametrize("max_tokens", [1, 2, 9, 17, 18, 40])
def test_blocks_give_the_host_tokens(path, ref, max_tokens):
    with blocked(path) as m:
        for i, p in enumerate(PROMPTS):
            want = ref.generate(p, max_tokens=max_tokens, ignore_eos=True, seed=11 + i, **SAMPLED)
            got = m.generate(p, max_tokens=max_tokens, ignore_eos=True, seed=11 + i, **SAMPLED)
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "length"
            assert got.text == want.text
        # the first token comes from the prompt's logits; then whole blocks and a shorter last one
        B = orcd.model.DEVICE_BLOCK
        steps = [k for _, k in m._engine.blocks]
        rest = max_tokens - 1
        want_steps = [B] * (rest // B) + ([rest % B] if rest % B else [])
        assert steps == want_steps * len(PROMPTS)


def test_stop_token_inside_a_block(path, ref):
    """A stop id first drawn inside the second block ends the generation there (the block's
    later draws dropped), and the slot serves the next request."""
    p = PROMPTS[1]
    full = ref.generate(p, max_tokens=30, ignore_eos=True, seed=5, **SAMPLED).token_ids
    j = next(j for j in range(orcd.model.DEVICE_BLOCK + 3, 30) if full[j] not in full[:j])
    with blocked(path) as m:
        got = m.generate(p, max_tokens=30, ignore_eos=True, seed=5, stop_token_ids=[full[j]], **SAMPLED)
        assert got.token_ids == full[:j] and got.finish_reason == "stop"
        assert all(s.users == 0 for s in m._slots)
        again = m.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, seed=6, **SAMPLED)
        assert again.token_ids == ref.generate(PROMPTS[0], max_tokens=12, ignore_eos=True, seed=6,
                                               **SAMPLED).token_ids


def test_stop_string_inside_a_block(path, ref):
    p = PROMPTS[0]
    full = ref.generate(p, max_tokens=30, ignore_eos=True, seed=8, **SAMPLED)
    text = full.text
    cut = len(text) * 2 // 3
    stop = text[cut:cut + 3]
    if not stop or text.find(stop) < cut:
        pytest.skip("no stop string that first occurs two thirds in")
    want = ref.generate(p, max_tokens=30, ignore_eos=True, seed=8, stop=[stop], **SAMPLED)
    with blocked(path) as m:
        got = m.generate(p, max_tokens=30, ignore_eos=True, seed=8, stop=[stop], **SAMPLED)
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    assert got.token_ids == want.token_ids


def test_stream_closed_inside_a_block(path, ref):
    """A stream dropped after 3 tokens of a block ends cleanly: nothing hangs, the slot is
    free, and the same Model then gives the host's tokens again."""
    with blocked(path) as m:
        s = m.stream(PROMPTS[1], max_tokens=40, ignore_eos=True, seed=2, **SAMPLED)
        it = iter(s)
        for _ in range(3):
            next(it)
        s.close()
        assert all(sl.users == 0 for sl in m._slots)
        got = m.generate(PROMPTS[1], max_tokens=20, ignore_eos=True, seed=3, **SAMPLED)
    assert got.token_ids == ref.generate(PROMPTS[1], max_tokens=20, ignore_eos=True, seed=3,
                                         **SAMPLED).token_ids


def test_two_threads_each_get_their_own_tokens(path, ref):
    """Two generations at once on one Model (two slots), their blocks interleaved on the
    engine: each gets the tokens it gets alone."""
    want = [ref.generate(p, max_tokens=33, ignore_eos=True, seed=40 + i, **SAMPLED).token_ids
            for i, p in enumerate(PROMPTS[:2])]
    got = [None, None]
    with blocked(path, n_slots=2) as m:
        def run(i):
            got[i] = m.generate(PROMPTS[i], max_tokens=33, ignore_eos=True, seed=40 + i, **SAMPLED).token_ids

        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert not any(t.is_alive() for t in ts)
    assert got == want


def test_penalties_take_the_host_path(path, ref):
    """decode_sample_steps refuses penalties (None): the generation goes on token by token."""
    kw = dict(SAMPLED, repetition_penalty=1.2)
    with blocked(path) as m:
        got = m.generate(PROMPTS[0], max_tokens=15, ignore_eos=True, seed=9, **kw)
        assert m._engine.blocks == []
    assert got.token_ids == ref.generate(PROMPTS[0], max_tokens=15, ignore_eos=True, seed=9, **kw).token_ids
