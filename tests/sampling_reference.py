"""The sampling chain of cpp/sampler.h written out in float64 NumPy, and a chi-square
check of draw counts against it: the independent reference for the CPU sampler
(tests/test_sampling.py) and the GPU sampler (tests/test_cuda_sampling.py)."""
from __future__ import annotations

import numpy as np


def chain_probs(logits, top_k, top_p, min_p, temperature):
    """The sampling chain of cpp/sampler.h in float64 NumPy (no penalties): probabilities per token."""
    w = logits.astype(np.float64)
    V = w.size
    order = sorted(range(V), key=lambda i: (-w[i], i))
    kept = order[:top_k] if 0 < top_k < V else order
    lmax = w[order[0]]
    z = np.exp(w[kept] - lmax).sum()
    if min_p > 0:
        kept = [i for i in kept if w[i] >= lmax + np.log(min_p)]
    if top_p < 1:
        cum, cut = 0.0, len(kept)
        for j, i in enumerate(kept):
            cum += np.exp(w[i] - lmax)
            if cum >= top_p * z:
                cut = j + 1
                break
        kept = kept[:cut]
    p = np.zeros(V)
    e = np.exp((w[kept] - lmax) / temperature)
    p[kept] = e / e.sum()
    return p


def chi_square_z(counts, probs) -> float:
    """Pearson's chi-square of draw counts against probabilities (cells expecting fewer
    than 5 draws pooled into one), as a z-score by the Wilson-Hilferty approximation:
    z > 3.7 means p < 1e-4."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum()
    keep = probs * n >= 5
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    obs = np.append(counts[keep], counts[~keep].sum())
    if exp[-1] == 0:
        exp, obs = exp[:-1], obs[:-1]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(((chi2 / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / np.sqrt(2 / (9 * dof)))
