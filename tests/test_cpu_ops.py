"""Each named operation of the CPU engine (cpp/cpu_ops.h, bound as
orcd._orcd.cpu_ops_<name>) against the NumPy reference's helpers
(tests/reference_qwen2.py) in float64.

Bounds (float32 arithmetic, u = 2^-24 the unit roundoff):
  rmsnorm      per element |got - ref| <= 4u |ref|: x exact, the scale is computed in
               double and rounded once, then two float products (3 roundings).
  add_bias     bitwise equal to NumPy's float32 x + b (one rounding, same IEEE op).
  rope_neox    ||got - ref|| / ||x|| < 1e-6: cos/sin rounded to float, two products and
               a sum per element (a few u of |x| per pair); exact at position 0.
  kv_append    bitwise: the written entries are the rows; every other entry keeps the
               NaN poison.
  attention    ||got - ref|| / ||ref|| < 1e-5: float32 scores over head_dim terms and
               float32 weighted sums over up to 1000 keys (error ~ sqrt(n) u relative);
               bitwise equal across thread counts (one task computes one (token, head)).
  swiglu       per element |got - ref| <= 1e-6 |ref| + 1e-37: exp (libm, <= 1 ulp), an
               add, a divide and a product, each within an ulp of float32.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from reference_qwen2 import gqa_attention, rms_norm, rope_adjacent, rope_neox, swiglu

core = pytest.importorskip("orcd._orcd")

U = 2.0 ** -24


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def rel_err(a, ref, scale=None) -> float:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert np.all(np.isfinite(a)), f"{np.count_nonzero(~np.isfinite(a))} non-finite outputs"
    scale = ref if scale is None else np.asarray(scale, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(scale), 1e-30))


def empty_cache(n_slots, n_head_kv, hd, n_ctx):
    """The engine's cache layout, poisoned: kt [slot, kv_head, e, pos], v [slot, pos, kv_head*hd]."""
    kt = np.full((n_slots, n_head_kv, hd, n_ctx), np.nan, np.float32)
    v = np.full((n_slots, n_ctx, n_head_kv * hd), np.nan, np.float32)
    return kt, v


# ------------------------------------------------------------------ rmsnorm, bias, rope, swiglu

@pytest.mark.parametrize("rows,n", [(1, 7), (3, 64), (5, 896), (2, 4864)])
def test_rmsnorm(rows, n):
    rng = rng_for("rms", rows, n)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.1, 30)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    got = core.cpu_ops_rmsnorm(x, w, 1e-6)
    ref = rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-6)
    assert got.shape == x.shape and got.dtype == np.float32
    assert np.all(np.abs(got - ref) <= 4 * U * np.abs(ref))


def test_rmsnorm_eps_matters():
    """A zero row gives zeros (eps keeps the scale finite), and eps enters the mean."""
    x = np.array([[0.0, 0.0], [1e-3, 1e-3]], np.float32)
    w = np.ones(2, np.float32)
    got = core.cpu_ops_rmsnorm(x, w, 1e-6)
    np.testing.assert_array_equal(got[0], [0.0, 0.0])
    np.testing.assert_allclose(got[1], rms_norm(x[1].astype(np.float64), 1.0, 1e-6), rtol=1e-6)
    assert abs(got[1, 0] - 1.0) > 0.1  # 1e-6 is not negligible against mean(x^2) = 1e-6


def test_add_bias():
    rng = rng_for("bias")
    for rows, n in ((1, 5), (7, 896), (3, 130)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        np.testing.assert_array_equal(core.cpu_ops_add_bias(x, b), x + b)


@pytest.mark.parametrize("n_tok,n_heads,hd", [(1, 14, 64), (5, 2, 64), (7, 4, 16), (3, 3, 128), (2, 1, 6)])
def test_rope_neox(n_tok, n_heads, hd):
    rng = rng_for("rope", n_tok, n_heads, hd)
    x = rng.standard_normal((n_tok, n_heads, hd)).astype(np.float32)
    pos = rng.integers(0, 32768, n_tok).astype(np.int32)
    pos[0] = 0
    got = core.cpu_ops_rope_neox(x, pos, 1e6)
    ref = rope_neox(x.astype(np.float64), pos, 1e6)
    assert rel_err(got, ref, x) < 1e-6
    np.testing.assert_array_equal(got[0], x[0])  # position 0: no rotation
    if n_tok > 1 and hd > 2:  # the GPT-J pairing is a different rotation: the bound can fail
        assert rel_err(got[1:], rope_adjacent(x[1:].astype(np.float64), pos[1:], 1e6), x[1:]) > 1e-2


def test_swiglu():
    rng = rng_for("swiglu")
    for n in (1, 33, 4864 * 3):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        ref = swiglu(g.astype(np.float64), u.astype(np.float64))
        for threads in (1, 2):
            got = core.cpu_ops_swiglu(g, u, n_threads=threads)
            assert np.all(np.abs(got - ref) <= 1e-6 * np.abs(ref) + 1e-37), n
    g = np.array([-100.0, -20.0, 0.0, 20.0, 100.0], np.float32)  # exp(-g) overflows / vanishes
    u = np.ones(5, np.float32)
    got = core.cpu_ops_swiglu(g, u)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, swiglu(g.astype(np.float64), 1.0), rtol=1e-6, atol=1e-37)


# ------------------------------------------------------------------ KV cache and attention

def test_kv_append_writes_only_its_entries():
    n_slots, n_head_kv, hd, n_ctx = 3, 2, 8, 11
    rng = rng_for("kv")
    kt, vc = empty_cache(n_slots, n_head_kv, hd, n_ctx)
    slots = np.array([0, 2, 2, 1, 0], np.int32)
    pos = np.array([0, 10, 3, 5, 7], np.int32)
    k = rng.standard_normal((5, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((5, n_head_kv, hd)).astype(np.float32)
    core.cpu_ops_kv_append(kt, vc, k, v, slots, pos)
    written = np.zeros((n_slots, n_ctx), bool)
    for i, (s, p) in enumerate(zip(slots, pos)):
        np.testing.assert_array_equal(kt[s, :, :, p], k[i])
        np.testing.assert_array_equal(vc[s, p], v[i].reshape(-1))
        written[s, p] = True
    assert np.isnan(kt.transpose(0, 3, 1, 2)[~written]).all()
    assert np.isnan(vc[~written]).all()


def test_kv_append_rejects_out_of_range():
    kt, vc = empty_cache(2, 1, 4, 5)
    k = np.zeros((1, 1, 4), np.float32)
    with pytest.raises(ValueError, match="pos 5 out of range"):
        core.cpu_ops_kv_append(kt, vc, k, k, np.array([0], np.int32), np.array([5], np.int32))
    with pytest.raises(ValueError, match="slot 2 out of range"):
        core.cpu_ops_kv_append(kt, vc, k, k, np.array([2], np.int32), np.array([0], np.int32))
    with pytest.raises(ValueError, match="head_dim"):
        core.cpu_ops_kv_append(kt, vc, np.zeros((1, 1, 6), np.float32), np.zeros((1, 1, 6), np.float32),
                               np.array([0], np.int32), np.array([0], np.int32))


@pytest.mark.parametrize("n_q,n_kv,n_head,n_head_kv,hd,mode", [
    (1, 1, 14, 2, 64, "decode"),        # first token
    (1, 1000, 14, 2, 64, "decode"),     # a long cache
    (77, 77, 14, 2, 64, "prompt"),      # causal prompt
    (33, 600, 4, 2, 16, "prompt_tail"),  # prompt chunk after cached positions
    (9, 300, 8, 1, 128, "random"),      # scattered positions
    (5, 40, 6, 3, 6, "random"),         # odd sizes
])
def test_attention(n_q, n_kv, n_head, n_head_kv, hd, mode):
    """Slot 1 of a 2-slot cache holds the keys (slot 0 holds other values); the
    queries attend through kv_append + attention as the engine runs them."""
    rng = rng_for("attn", n_q, n_kv, n_head, hd, mode)
    q = (2 * rng.standard_normal((n_q, n_head, hd))).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    if mode == "decode":
        pos = np.array([n_kv - 1], np.int32)
    elif mode == "prompt":
        pos = np.arange(n_q, dtype=np.int32)
    elif mode == "prompt_tail":
        pos = np.arange(n_kv - n_q, n_kv, dtype=np.int32)
    else:
        pos = rng.integers(0, n_kv, n_q).astype(np.int32)
    n_ctx = n_kv + 3
    kt, vc = empty_cache(2, n_head_kv, hd, n_ctx)
    other = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32) * 5
    core.cpu_ops_kv_append(kt, vc, other, other, np.zeros(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    core.cpu_ops_kv_append(kt, vc, k, v, np.ones(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    slots = np.ones(n_q, np.int32)
    ref = gqa_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), pos)
    got = core.cpu_ops_attention(q, kt, vc, slots, pos, n_threads=1)
    assert got.shape == q.shape
    e = rel_err(got, ref)
    assert e < 1e-5, f"rel err {e:.2e}"
    np.testing.assert_array_equal(core.cpu_ops_attention(q, kt, vc, slots, pos, n_threads=2), got)


def test_attention_gqa_mapping_and_slots():
    """Query head h reads KV head h // group (the 'mod' mapping gives another
    answer), and a query reads only its own slot."""
    rng = rng_for("attn-map")
    n_kv, n_head, n_head_kv, hd = 20, 6, 3, 8
    q = (3 * rng.standard_normal((1, n_head, hd))).astype(np.float32)
    k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    kt, vc = empty_cache(2, n_head_kv, hd, n_kv)
    core.cpu_ops_kv_append(kt, vc, k, v, np.zeros(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    core.cpu_ops_kv_append(kt, vc, -k, -v, np.ones(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    pos = np.array([n_kv - 1], np.int32)
    kd, vd = k.astype(np.float64), v.astype(np.float64)
    got0 = core.cpu_ops_attention(q, kt, vc, np.array([0], np.int32), pos)
    assert rel_err(got0, gqa_attention(q.astype(np.float64), kd, vd, pos)) < 1e-5
    assert rel_err(got0, gqa_attention(q.astype(np.float64), kd, vd, pos, lambda h: h % n_head_kv)) > 1e-2
    got1 = core.cpu_ops_attention(q, kt, vc, np.array([1], np.int32), pos)
    assert rel_err(got1, gqa_attention(q.astype(np.float64), -kd, -vd, pos)) < 1e-5


def test_attention_rejects_bad_shapes():
    kt, vc = empty_cache(1, 2, 8, 4)
    q = np.zeros((1, 3, 8), np.float32)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        core.cpu_ops_attention(q, kt, vc, np.array([0], np.int32), np.array([0], np.int32))
    q = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="pos 4 out of range"):
        core.cpu_ops_attention(q, kt, vc, np.array([0], np.int32), np.array([4], np.int32))
