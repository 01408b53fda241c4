"""KV memory shared by the slots (cpp/kv_pool.h) on the CUDA engine: the kernels find each
slot's positions through the device slot table, and a slot that grows where its neighbour sits
moves (every layer's K and V copied) without changing what it computes.

What must hold:
- Growth by a move: a slot moved to another range gives logits within 1e-5 x the largest |logit|
  of an engine where it never moved (the same kernels on other addresses; in practice bitwise),
  and the greedy tokens after it are the same; the neighbour's cache is untouched.
- A pool of kv_memory bytes holds kv_memory / (n_layer x kv_dim x 2 x 2) positions (fp16 K and V),
  whole units; a write past it is "KV memory full", after which the slot's cache is intact.
- The real model through the step loop with a pool of two sequences for eight slots: requests
  wait for memory (kv_waits) and each gets the greedy tokens it gets alone.

Skipped as a whole when orcd._orcd_cuda is missing or no usable GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()


def _pos_bytes(info):
    return info["n_layer"] * info["n_head_kv"] * info["head_dim"] * 2 * 2


def _ids(V, n, seed):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.int32)


def test_moved_slot_computes_the_same(tiny_model):
    path = tiny_model("Q8_0")
    ref = cu.CudaEngine(path, 256, 2)
    info = ref.info()
    unit, V = info["kv_pool_unit"], info["n_vocab"]
    e = cu.CudaEngine(path, 256, 2, kv_memory=4 * unit * _pos_bytes(info))
    assert e.info()["kv_pool_positions"] == 4 * unit
    p0, p1, more = _ids(V, 10, 1), _ids(V, 12, 2), _ids(V, unit, 3)
    for eng in (e, ref):
        eng.forward(0, p0, 0)
        eng.forward(1, p1, 0)
    assert e.kv_reserved(0) == unit and e.kv_reserved(1) == unit
    got = e.forward(0, more, 10)  # slot 1 sits right after slot 0: slot 0 moves to [2u, 4u)
    want = ref.forward(0, more, 10)
    assert e.kv_reserved(0) == 2 * unit and e.info()["kv_pool_reserved"] == 3 * unit
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
    t = int(np.argmax(want))
    assert list(e.decode_greedy(0, t, 10 + unit, 6)) == list(ref.decode_greedy(0, t, 10 + unit, 6))
    # the neighbour was not touched by the move
    t1 = int(np.argmax(ref.forward(1, p1[-1:], 11)))
    assert int(np.argmax(e.forward(1, p1[-1:], 11))) == t1
    assert list(e.decode_greedy(1, t1, 12, 6)) == list(ref.decode_greedy(1, t1, 12, 6))
    e.close()
    ref.close()


def test_full_pool_is_an_error_and_the_cache_survives(tiny_model):
    path = tiny_model("Q8_0")
    ref = cu.CudaEngine(path, 256, 1)
    info = ref.info()
    unit, V = info["kv_pool_unit"], info["n_vocab"]
    e = cu.CudaEngine(path, 256, 3, kv_memory=4 * unit * _pos_bytes(info))  # 256 positions: one n_ctx
    p = _ids(V, 20, 4)
    e.forward(0, p, 0)
    assert e.kv_reserve(1, 2 * unit) and e.kv_reserve(2, unit)
    with pytest.raises(ValueError, match="KV memory full: slot 0 needs"):
        e.forward(0, _ids(V, unit, 5), 20)
    t = int(np.argmax(ref.forward(0, p, 0)))
    assert list(e.decode_greedy(0, t, 20, 8)) == list(ref.decode_greedy(0, t, 20, 8))
    e.kv_release(1)
    assert e.kv_reserve(0, 3 * unit)  # grows into slot 1's old range, in place
    e.close()
    ref.close()


def test_real_model_small_pool_step_loop_equals_alone(real_model_path, tok, monkeypatch):
    from orcd.batch import BatchRunner
    from orcd.types import SamplingParams
    from test_cuda_batch import _long_prompts, _run
    e = cu.CudaEngine(real_model_path, 512, 1)
    pos_bytes = _pos_bytes(e.info())
    e.close()
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = _long_prompts(tok, 8)
    with BatchRunner(real_model_path, device="cuda", n_ctx=512, n_slots=8, kv_memory=2 * 512 * pos_bytes) as r:
        reqs = [r.submit(q, p.replace(seed=100 + i)) for i, q in enumerate(prompts)]
        got = [list(q) for q in reqs]
        st = r.stats()
    assert st["kv_positions"] == 2 * 512 and st["kv_waits"] > 0, st
    want = [_run(real_model_path, [q], 1, p, monkeypatch, ORCD_CUDA_FAST_DECODE="0")[0] for q in prompts]
    assert got == want


# ------------------------------------------------------------------ prompt chunks of several slots in one pass
@pytest.mark.parametrize("lens", [(5, 9, 3), (40, 300, 17, 120)])
def test_forward_rows_equals_a_forward_per_slot(tiny_model, lens):
    """One pass over the prompt rows of several slots (the decode-shaped attention, per-row slots)
    against a forward per slot (flash attention where a prompt has 16+ rows): logits within
    1e-4 x the largest |logit| (float32 sums in another order), then the same greedy tokens."""
    path = tiny_model("Q8_0")
    n = len(lens)
    a, b = cu.CudaEngine(path, 512, n), cu.CudaEngine(path, 512, n)
    V = a.info()["n_vocab"]
    prompts = [_ids(V, m, 10 + i) for i, m in enumerate(lens)]
    slots = np.concatenate([np.full(m, s, np.int32) for s, m in enumerate(lens)])
    pos = np.concatenate([np.arange(m, dtype=np.int32) for m in lens])
    ends = np.cumsum(lens) - 1
    got = a.forward_rows(slots, np.concatenate(prompts), pos, ends.astype(np.int32))
    want = np.stack([b.forward(s, q, 0) for s, q in enumerate(prompts)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    for s, m in enumerate(lens):
        t = int(np.argmax(want[s]))
        assert list(a.decode_greedy(s, t, m, 4)) == list(b.decode_greedy(s, t, m, 4))
    a.close()
    b.close()
