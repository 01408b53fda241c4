"""orcd._orcd.Sampler against a NumPy implementation of the same chain:
penalties -> (greedy) -> top_k -> top_p -> min_p -> temperature -> softmax."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

_orcd = pytest.importorskip("orcd._orcd")

PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
             presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=0)


def make(**kw):
    p = dict(PLAIN)
    p.update(kw)
    return _orcd.Sampler(**p)


def penalized(logits, history, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
              penalty_last_n=64, **_):
    x = np.asarray(logits, np.float64).copy()
    h = list(history)
    if penalty_last_n == 0:
        return x
    if penalty_last_n > 0:
        h = h[-penalty_last_n:]
    for t in set(h):
        c = h.count(t)
        if repetition_penalty != 1.0:
            x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
        x[t] -= c * frequency_penalty + presence_penalty
    return x


def reference_probs(logits, history=(), **kw):
    """Probability of each token under the chain (NumPy, float64)."""
    p = dict(PLAIN)
    p.update(kw)
    x = penalized(logits, history, **p)
    n = len(x)
    order = sorted(range(n), key=lambda i: (-x[i], i))
    keep = order
    if p["top_k"] > 0:
        keep = keep[: p["top_k"]]
    lmax = x[keep[0]]
    if p["top_p"] < 1.0:
        w = np.exp(x[keep] - lmax)
        cum = np.cumsum(w) / w.sum()
        cut = int(np.searchsorted(cum, p["top_p"])) + 1  # first index with cum >= top_p
        keep = keep[: max(1, min(cut, len(keep)))]
    if p["min_p"] > 0.0:
        keep = [i for i in keep if math.exp(x[i] - lmax) >= p["min_p"]]
    probs = np.zeros(n)
    if p["temperature"] == 0.0:
        probs[order[0]] = 1.0
        return probs
    w = np.exp((x[keep] - lmax) / p["temperature"])
    probs[keep] = w / w.sum()
    return probs


def chi_square_z(counts, probs):
    """Wilson-Hilferty z-score of Pearson's chi-square (bins with >= 5 expected
    merged into one tail bin otherwise)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_b = list(counts[big]) + [counts[~big].sum()]
    exp_b = list(exp[big]) + [exp[~big].sum()]
    if exp_b[-1] < 5:  # fold a thin tail into the last big bin
        obs_b[-2] += obs_b.pop()
        exp_b[-2] += exp_b.pop()
    obs_b, exp_b = np.array(obs_b, float), np.array(exp_b, float)
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    k = len(obs_b) - 1
    if k < 1:
        return 0.0
    return ((chi2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))


CONFIGS = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=1.6, top_k=12),
    dict(top_p=0.8),
    dict(top_p=0.5, temperature=1.3),
    dict(min_p=0.1),
    dict(top_k=20, top_p=0.9, min_p=0.05, temperature=0.8),  # the defaults' shape
    dict(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3, penalty_last_n=6),
    dict(repetition_penalty=0.7, frequency_penalty=-0.5, penalty_last_n=-1, top_p=0.9),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "plain"
                                              for c in CONFIGS])
def test_distribution_matches_numpy(cfg):
    rng = np.random.default_rng(17)
    n_vocab = 48
    logits = (rng.standard_normal(n_vocab) * 1.5).astype(np.float32)
    history = np.array([3, 3, 7, 11, 3, 40, 7, 0, 5, 5], np.int32)
    probs = reference_probs(logits, history.tolist(), **cfg)
    s = make(seed=12345, **cfg)
    n = 30000
    before = logits.copy()
    draws = np.array([s.sample(logits, history) for _ in range(n)])
    assert np.array_equal(logits, before)  # not modified
    counts = np.bincount(draws, minlength=n_vocab)
    # Exactly the tokens the chain keeps can be drawn.
    assert set(np.nonzero(counts)[0]) <= set(np.nonzero(probs)[0])
    z = chi_square_z(counts, probs)
    assert z < 4.5, (z, counts, np.round(probs * n))


def test_greedy_is_penalized_argmax_lowest_index():
    rng = np.random.default_rng(5)
    for trial in range(50):
        logits = rng.integers(-3, 4, 30).astype(np.float32)  # many ties
        history = rng.integers(0, 30, 8).astype(np.int32)
        cfg = dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)
        x = penalized(logits, history.tolist(), **dict(PLAIN, **cfg))
        want = int(np.argmax(x))  # NumPy argmax: first maximum
        assert make(**cfg).sample(logits, history) == want
    ties = np.array([1.0, 5.0, 5.0, 5.0], np.float32)
    assert make(temperature=0.0).sample(ties, np.zeros(0, np.int32)) == 1


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal(1000).astype(np.float32)
    s = make(top_k=1, temperature=2.0, seed=1)
    h = np.zeros(0, np.int32)
    assert {s.sample(logits, h) for _ in range(50)} == {int(np.argmax(logits))}


def test_seed_determinism():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(151936).astype(np.float32)
    h = np.arange(100, dtype=np.int32)
    cfg = dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1)
    a = [make(seed=77, **cfg).sample(logits, h) for _ in range(1)]
    s1, s2, s3 = make(seed=77, **cfg), make(seed=77, **cfg), make(seed=78, **cfg)
    x = [s1.sample(logits, h) for _ in range(100)]
    y = [s2.sample(logits, h) for _ in range(100)]
    z = [s3.sample(logits, h) for _ in range(100)]
    assert x == y
    assert x[0] == a[0]
    assert x != z
    assert len(set(x)) > 3
    # The full 64-bit seed range is accepted.
    make(seed=2**64 - 1).sample(logits, h)


def test_large_vocab_nucleus_support_and_speed():
    rng = np.random.default_rng(4)
    n = 151936
    logits = (rng.standard_normal(n) * 4).astype(np.float32)
    h = np.zeros(0, np.int32)
    probs = reference_probs(logits, (), top_p=0.9)
    allowed = set(np.nonzero(probs)[0])
    assert len(allowed) > 100
    s = make(top_p=0.9, seed=5)
    t0 = time.perf_counter()
    got = [s.sample(logits, h) for _ in range(100)]
    dt = (time.perf_counter() - t0) / 100
    assert set(got) <= allowed
    assert len(set(got)) > 50
    assert dt < 0.05, f"{dt * 1e3:.1f} ms per token"
    d = make(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=5)
    t0 = time.perf_counter()
    for _ in range(100):
        d.sample(logits, h)
    assert (time.perf_counter() - t0) / 100 < 0.05


@pytest.mark.parametrize("name,value,message", [
    ("temperature", -1.0, "temperature must be >= 0 (got -1)"),
    ("temperature", float("nan"), "temperature must be >= 0"),
    ("temperature", float("inf"), "temperature must be finite"),
    ("top_p", 1.5, "top_p must be in (0, 1] (got 1.5)"),
    ("top_p", 0.0, "top_p must be in (0, 1] (got 0)"),
    ("min_p", -0.5, "min_p must be in [0, 1] (got -0.5)"),
    ("min_p", 1.5, "min_p must be in [0, 1] (got 1.5)"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0 (got 0)"),
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2] (got 2.5)"),
    ("frequency_penalty", -3.0, "frequency_penalty must be in [-2, 2] (got -3)"),
    ("penalty_last_n", -2, "penalty_last_n must be >= -1 (got -2)"),
])
def test_invalid_parameters_raise_value_error(name, value, message):
    with pytest.raises(ValueError) as e:
        make(**{name: value})
    assert str(e.value).startswith(message)


def test_bad_history_raises():
    s = make()
    logits = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="history token 10 out of range"):
        s.sample(logits, np.array([1, 10], np.int32))
    with pytest.raises(ValueError, match="history token -1 out of range"):
        s.sample(logits, np.array([-1], np.int32))
    with pytest.raises(ValueError):
        s.sample(np.full(4, -np.inf, np.float32), np.zeros(0, np.int32))


@pytest.mark.parametrize("cfg", [dict(top_k=50, top_p=0.9, min_p=0.0, temperature=0.8),
                                 dict(top_k=0, top_p=1.0, min_p=0.02, temperature=1.0),
                                 dict(top_k=0, top_p=0.7, min_p=0.0, temperature=1.2)])
def test_draw_frequencies_follow_the_chain(cfg):
    """The CPU sampler's draws (one seed per draw) against the chain's probabilities
    computed independently in NumPy (tests/sampling_reference.py)."""
    from sampling_reference import chain_probs, chi_square_z

    rng = np.random.default_rng(7)
    V = 1000
    row = rng.normal(0, 1.5, size=V).astype(np.float32)
    probs = chain_probs(row, **cfg)
    hist = np.zeros(0, np.int32)
    counts = np.zeros(V)
    for seed in range(20000):
        counts[_orcd.Sampler(**cfg, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                             penalty_last_n=64, seed=seed).sample(row, hist)] += 1
    assert counts[probs == 0].sum() == 0, "drew a token the chain excludes"
    assert chi_square_z(counts, probs) < 3.7
