"""KV memory shared by the slots (cpp/kv_pool.h) on the CPU engine and through the C++ step loop.

What must hold:
- The pool holds every slot's n_ctx positions by default (each rounded up to kv_pool_unit), or
  what kv_memory buys at n_layer x kv_dim x 2 (K and V) x 4 bytes (float32) a position, at least
  one sequence of n_ctx (a ValueError naming kv_memory and n_ctx below that).
- kv_reserve takes whole units, first fit; False and nothing changed when no free range is long
  enough; kv_release gives the range back (neighbours merge: two released halves take one
  request of both). A write past a slot's range reserves it, or raises "KV memory full".
- The step loop reserves prompt + max_tokens per request; with a pool smaller than n_slots x
  n_ctx the requests that do not fit wait (stats kv_waits) and every request still gets the tokens
  it gets alone; idle slots give their cached prefixes back when an admission needs the room.
- reuse_prefix=False (the server's cache_prompt) evaluates the whole prompt again.
"""
from __future__ import annotations

import numpy as np
import pytest

import orcd
from orcd import _orcd
from orcd.sizes import parse_bytes

from test_step_loop import alone, drain, prompts_for, submit

N_CTX = 96


@pytest.fixture(scope="module")
def tiny(tiny_model):
    path = tiny_model("Q8_0")
    model = orcd.Model(path, device="cpu", n_ctx=N_CTX)
    yield path, model
    model.close()


def pos_bytes(info):
    return info["n_layer"] * info["n_head_kv"] * info["head_dim"] * 2 * 4


def per_slot(info, n_ctx=N_CTX):
    u = info["kv_pool_unit"]
    return -(-n_ctx // u) * u


def engine_with(path, n_slots, sequences):
    """A CPU engine of n_slots whose pool holds `sequences` sequences of N_CTX."""
    probe = _orcd.CpuEngine(path, N_CTX, 1)
    info = probe.info()
    probe.close()
    e = _orcd.CpuEngine(path, N_CTX, n_slots, kv_memory=sequences * per_slot(info) * pos_bytes(info))
    return e, info


def test_default_pool_holds_every_slot(tiny):
    path, _ = tiny
    e = _orcd.CpuEngine(path, N_CTX, 3)
    info = e.info()
    assert info["kv_pool_positions"] == 3 * per_slot(info)
    assert info["kv_pool_reserved"] == 0 and info["kv_pool_largest_free"] == info["kv_pool_positions"]
    e.close()


def test_budget_reserve_release(tiny):
    path, _ = tiny
    e, info = engine_with(path, 3, 2)
    unit = info["kv_pool_unit"]
    assert e.info()["kv_pool_positions"] == 2 * per_slot(info)
    assert e.kv_reserve(0, N_CTX) and e.kv_reserve(1, N_CTX)
    assert e.kv_reserved(0) == N_CTX  # capped at n_ctx (the range is a whole unit count)
    assert not e.kv_reserve(2, 1)  # full: nothing changes
    assert e.kv_reserved(2) == 0 and e.info()["kv_pool_reserved"] == 2 * per_slot(info)
    e.kv_release(0)
    assert e.kv_reserve(2, 1) and e.info()["kv_pool_reserved"] == per_slot(info) + unit
    e.kv_release(1)
    e.kv_release(2)
    st = e.info()
    assert st["kv_pool_reserved"] == 0 and st["kv_pool_largest_free"] == st["kv_pool_positions"]  # merged
    for bad in (0, N_CTX + 1):
        with pytest.raises(ValueError, match="n_positions"):
            e.kv_reserve(0, bad)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        e.kv_release(3)
    e.close()


def test_budget_below_one_sequence_is_a_clear_error(tiny):
    path, _ = tiny
    e = _orcd.CpuEngine(path, N_CTX, 1)
    info = e.info()
    e.close()
    with pytest.raises(ValueError, match=r"kv_memory of \d+ bytes holds 0 positions; one sequence of n_ctx = 96"):
        _orcd.CpuEngine(path, N_CTX, 2, kv_memory=10 * pos_bytes(info))


def test_writes_reserve_and_a_full_pool_is_an_error(tiny):
    path, model = tiny
    e, info = engine_with(path, 3, 2)
    unit = info["kv_pool_unit"]
    p = prompts_for(3, seed=3, lo=10, hi=10)
    for s in range(3):  # each takes one unit: 3 units of the 4 the pool holds
        e.forward(s, np.asarray(p[s], np.int32), 0)
        assert e.kv_reserved(s) == unit
    longer = np.asarray(prompts_for(1, seed=5, lo=unit, hi=unit)[0], np.int32)
    with pytest.raises(ValueError, match="KV memory full: slot 0 needs 74 positions"):
        e.forward(0, longer, 10)
    # slot 0's cache is intact: its next tokens are those of the prompt run alone
    first = int(np.argmax(e.forward(0, np.asarray(p[0][-1:], np.int32), 9)))
    got = [first] + [int(t) for t in e.decode_greedy(0, first, 10, 3)]
    assert got == alone(model, p[0], 4)
    e.close()


def test_step_loop_waits_for_memory_and_matches_alone(tiny):
    path, model = tiny
    e, info = engine_with(path, 1, 1)
    e.close()
    budget = 2 * per_slot(info) * pos_bytes(info)
    prompts = prompts_for(8, seed=21, lo=20, hi=40)
    max_tokens = 40  # prompt + 40 > 64: two units a request, so two of the four slots run at once
    want = [alone(model, p, max_tokens) for p in prompts]
    loop = _orcd.StepLoop(path, n_ctx=N_CTX, n_slots=4, prefill_chunk=16, kv_memory=budget)
    for i, p in enumerate(prompts):
        assert submit(loop, i, p, max_tokens)
    got = drain(loop, list(range(len(prompts))))
    assert [got[i][0] for i in range(len(prompts))] == want
    st = loop.stats()
    assert st["kv_waits"] > 0, st
    assert st["kv_positions"] == 2 * per_slot(info)
    assert st["finished"] == len(prompts) and st["running"] == 0
    loop.close()


def test_idle_prefixes_give_their_memory_back(tiny):
    path, model = tiny
    e, info = engine_with(path, 1, 1)
    e.close()
    unit = info["kv_pool_unit"]
    loop = _orcd.StepLoop(path, n_ctx=N_CTX, n_slots=3, kv_memory=2 * per_slot(info) * pos_bytes(info))
    small = prompts_for(1, seed=8, lo=8, hi=8)[0]
    submit(loop, 1, small, 4)  # ends holding one unit as a cached prefix
    drain(loop, [1])
    assert loop.stats()["kv_reserved"] == unit
    # two requests of a whole sequence each: together the whole pool, so the prefix must go
    big = prompts_for(2, seed=9, lo=50, hi=50)
    for i, p in enumerate(big):
        submit(loop, 10 + i, p, N_CTX - 50)
    got = drain(loop, [10, 11])
    for i, p in enumerate(big):
        assert got[10 + i][1] == "length"
        assert got[10 + i][0] == alone(model, p, N_CTX - 50)
    loop.close()


def test_reuse_prefix_false_evaluates_the_whole_prompt(tiny):
    path, _ = tiny
    p = prompts_for(1, seed=4, lo=30, hi=30)[0]
    loop = _orcd.StepLoop(path, n_ctx=N_CTX, n_slots=1)
    submit(loop, 1, p, 4)
    a = drain(loop, [1])[1][0]
    before = loop.stats()["prompt_tokens"]
    s = dict(temperature=0.0, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0, penalty_last_n=64, seed=0)
    loop.submit(2, np.asarray(p, np.int32), 4, [], *s.values(), reuse_prefix=False)
    b = drain(loop, [2])[2][0]
    assert loop.stats()["prompt_tokens"] - before == len(p)
    assert b == a
    loop.close()


@pytest.mark.parametrize("text,want", [(None, None), (0, None), (4096, 4096), ("512M", 512 << 20),
                                       ("2G", 2 << 30), ("2GiB", 2 << 30), ("1.5gb", 3 << 29), (" 64 K ", 64 << 10)])
def test_parse_bytes(text, want):
    assert parse_bytes(text, "kv_memory") == want


@pytest.mark.parametrize("text", ["2 apples", "-1", "G", "1e9"])
def test_parse_bytes_refuses_nonsense(text):
    with pytest.raises(ValueError, match="kv_memory"):
        parse_bytes(text, "kv_memory")


def test_model_kv_memory(tiny):
    """Two slots sharing one sequence's memory: two interleaved streams, each slot taking the
    other's memory when it writes (the idle one gives it back), both give their lone-run tokens."""
    path, model = tiny
    info = model.info
    m = orcd.Model(path, device="cpu", n_ctx=N_CTX, n_slots=2, kv_memory=per_slot(info) * pos_bytes(info))
    assert m.info["kv_pool_positions"] == per_slot(info)
    p, q = prompts_for(2, seed=30, lo=40, hi=40)
    assert m.generate(p, max_tokens=30, temperature=0, ignore_eos=True).token_ids == alone(model, p, 30)
    assert m.generate(q, max_tokens=30, temperature=0, ignore_eos=True).token_ids == alone(model, q, 30)
    kw = dict(max_tokens=30, temperature=0, ignore_eos=True)
    a, b = m.stream(p, **kw), m.stream(q, **kw)
    got_a, got_b = [next(a)], [next(b)]  # slot 1 takes the memory slot 0 held for p's 40+ positions
    for x, y in zip(a, b):  # turn by turn: each step takes the memory back and re-evaluates
        got_a.append(x)
        got_b.append(y)
    got_a += list(a)
    got_b += list(b)
    assert "".join(got_a) == model.generate(p, **kw).text and "".join(got_b) == model.generate(q, **kw).text
    m.close()


# ------------------------------------------------------------------ prompt chunks of several slots in one pass
def test_forward_rows_equals_a_forward_per_slot(tiny):
    """forward_rows (the CPU engine's: a forward per run of one slot) against forwards of each
    slot alone: the same logits for the out rows, inner rows included, and the same caches after
    (the next greedy tokens)."""
    path, _ = tiny
    a, b = _orcd.CpuEngine(path, N_CTX, 3), _orcd.CpuEngine(path, N_CTX, 3)
    p = prompts_for(3, seed=40, lo=5, hi=12)
    for e in (a, b):  # slot 2 already holds 4 positions
        e.forward(2, np.asarray(p[2][:4], np.int32), 0)
    slots, toks, pos = [], [], []
    for s, (start, ids) in enumerate([(0, p[0]), (0, p[1]), (4, p[2][4:])]):
        slots += [s] * len(ids)
        toks += ids
        pos += list(range(start, start + len(ids)))
    ends = [len(p[0]) - 1, len(p[0]) + len(p[1]) - 1, len(slots) - 1]
    out_rows = [ends[2], 2, ends[0], ends[1]]  # any order, an inner row too
    got = a.forward_rows(np.asarray(slots, np.int32), np.asarray(toks, np.int32), np.asarray(pos, np.int32),
                         np.asarray(out_rows, np.int32))
    w0 = b.forward(0, np.asarray(p[0], np.int32), 0, True)
    w1 = b.forward(1, np.asarray(p[1], np.int32), 0)
    w2 = b.forward(2, np.asarray(p[2][4:], np.int32), 4)
    np.testing.assert_array_equal(got, np.stack([w2, w0[2], w0[-1], w1]))
    for s, n in ((0, len(p[0])), (1, len(p[1])), (2, len(p[2]))):
        t = int(np.argmax(got[[2, 3, 0][s]]))
        assert list(a.decode_greedy(s, t, n, 3)) == list(b.decode_greedy(s, t, n, 3))
    with pytest.raises(ValueError, match="consecutive positions"):
        a.forward_rows(np.asarray([0, 1, 0], np.int32), np.asarray([1, 2, 3], np.int32),
                       np.asarray([0, 0, 2], np.int32), np.asarray([2], np.int32))
    with pytest.raises(ValueError, match="out row 3 out of range"):
        a.forward_rows(np.asarray([0], np.int32), np.asarray([1], np.int32), np.asarray([0], np.int32),
                       np.asarray([3], np.int32))
    a.close()
    b.close()
