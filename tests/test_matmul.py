"""CPU matmul (cpp/matmul.cpp) through orcd._orcd.matmul vs NumPy.

y = x · Wᵀ with W given as raw GGUF bytes of every supported type. The
reference is the float64 product with W dequantized by gguf.quants.dequantize.

Weights: gguf.quants.quantize of Gaussian floats where gguf supports the type
(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); random code bytes with random
finite fp16 scales for the K-quants (gguf cannot quantize those).

Tolerances: the integer kernels quantize each activation block (32 values, or
256 for K-quants) to 16-bit codes with step amax/QMAX (QMAX = 32767, K-quants
16383), so |x - x_q| <= amax/(2*QMAX) per element and
    |y - y_ref| <= sum_blocks amax_block/(2*QMAX) * sum_block |w|
plus float32 summation error (<= 2*n_in*2^-24 * sum|x*w|). That bound is checked
per output; the relative error must also be small (< 5e-4; ~1e-5 typical).
Float types and the dequantize fallback have only the float32 summation term.
"""
from __future__ import annotations

import numpy as np
import pytest

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

orcd = pytest.importorskip("orcd")
from orcd import _orcd  # noqa: E402

INT_KERNEL = {QT.Q4_0, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K}
GGUF_QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                    QT.MXFP4]  # MXFP4 (gpt-oss experts): rows dequantized to float scratch
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL_TYPES = GGUF_QUANTIZABLE + K_TYPES
F16_FIELDS = {QT.Q2_K: [80, 82], QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def make_weights(rng, qtype, n_in, n_out):
    """(raw uint8 bytes, dequantized float64 [n_out, n_in])."""
    if qtype in GGUF_QUANTIZABLE:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
        q = gguf_quantize(w, qtype)
        raw = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
    else:
        bs, bb = GGML_QUANT_SIZES[qtype]
        nblocks = n_out * n_in // bs
        raw = rng.integers(0, 256, size=nblocks * bb, dtype=np.uint8)
        blocks = raw.reshape(nblocks, bb)
        for off in F16_FIELDS[qtype]:
            scale = (rng.uniform(0.001, 0.05, nblocks) * rng.choice([-1, 1], nblocks)).astype(np.float16)
            blocks[:, off:off + 2] = scale.view(np.uint8).reshape(nblocks, 2)
    deq = gguf_dequantize(raw.reshape(n_out, -1), qtype).astype(np.float64).reshape(n_out, n_in)
    return raw, deq


def make_acts(rng, m, n_in):
    """Gaussian with a few 20x outliers per row and one all-zero block."""
    x = rng.standard_normal((m, n_in)).astype(np.float32)
    for i in range(m):
        x[i, rng.integers(0, n_in, 3)] *= 20
    if m > 1 and n_in >= 64:
        x[1, 32:64] = 0
    return x


def error_bound(qtype, x, W):
    x64 = x.astype(np.float64)
    absprod = np.abs(x64) @ np.abs(W).T
    n_in = x.shape[1]
    float_term = 2 * n_in * 2.0 ** -24 * absprod
    if qtype not in INT_KERNEL:
        return float_term + 1e-30
    B = 256 if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else 32
    qmax = 16383 if B == 256 else 32767
    amax = np.abs(x64).reshape(x.shape[0], -1, B).max(-1)             # [m, nb]
    wabs = np.abs(W).reshape(W.shape[0], -1, B).sum(-1)               # [n_out, nb]
    qterm = (amax / (2 * qmax)) @ wabs.T
    return qterm * 1.001 + 2 * n_in * 2.0 ** -24 * (absprod + qterm) + 1e-30


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_vs_numpy(qtype):
    rng = np.random.default_rng(int(qtype) + 17)
    bs = GGML_QUANT_SIZES[qtype][0]
    n_in = 768 if bs == 256 else (352 if bs == 32 else 301)
    n_out = 45  # odd, not a multiple of the thread counts
    raw, W = make_weights(rng, qtype, n_in, n_out)
    for m in (1, 3, 16, 37):   # m >= 16 uses the packed-tile kernels
        x = make_acts(rng, m, n_in)
        ref = x.astype(np.float64) @ W.T
        ys = [_orcd.matmul(int(qtype), raw, n_in, n_out, x, n_threads=t) for t in (1, 2, 3)]
        y = ys[0]
        assert y.shape == (m, n_out) and y.dtype == np.float32
        for other in ys[1:]:   # any thread count gives the same bits
            np.testing.assert_array_equal(y.view(np.uint32), other.view(np.uint32))
        err = np.abs(y.astype(np.float64) - ref)
        bound = error_bound(qtype, x, W)
        bad = np.argwhere(err > bound)
        assert bad.size == 0, f"{qtype.name} m={m}: {len(bad)} outputs over the bound, first {bad[0]}: " \
                              f"{y[tuple(bad[0])]} vs {ref[tuple(bad[0])]} (bound {bound[tuple(bad[0])]})"
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < (5e-4 if qtype in INT_KERNEL else 1e-5), f"{qtype.name} m={m}: relative error {rel}"


def test_matmul_default_threads_and_large_m():
    rng = np.random.default_rng(3)
    raw, W = make_weights(rng, QT.Q8_0, 512, 133)
    x = make_acts(rng, 70, 512)
    y = _orcd.matmul(int(QT.Q8_0), raw, 512, 133, x)  # n_threads=0: all cores
    ref = x.astype(np.float64) @ W.T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4
    # rows computed one at a time agree with the batched product
    for i in (0, 33, 69):
        yi = _orcd.matmul(int(QT.Q8_0), raw, 512, 133, x[i:i + 1], n_threads=1)
        np.testing.assert_allclose(yi[0], y[i], rtol=1e-4, atol=1e-4 * np.abs(y[i]).max())


def test_matmul_errors():
    raw = np.zeros(34 * 4, np.uint8)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError):   # too few weight bytes
        _orcd.matmul(int(QT.Q8_0), raw, 64, 3, x)
    with pytest.raises(ValueError):   # x columns != n_in
        _orcd.matmul(int(QT.Q8_0), raw, 32, 2, x)
    with pytest.raises(ValueError):   # n_in not a multiple of the block size
        _orcd.matmul(int(QT.Q8_0), raw, 48, 2, np.zeros((1, 48), np.float32))
    with pytest.raises(ValueError):   # a type without kernel or dequantizer (IQ2_XXS)
        _orcd.matmul(16, np.zeros(66 * 2, np.uint8), 256, 2, np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError):   # unknown type id
        _orcd.matmul(12345, raw, 32, 1, np.zeros((1, 32), np.float32))


def test_matmul_real_weights(real_model_path):
    """The real model's tensor types (Q5_0, Q8_0, Q4_K, Q6_K) on its own weights."""
    from gguf import GGUFReader
    r = GGUFReader(real_model_path)
    tensors = {t.name: t for t in r.tensors}
    rng = np.random.default_rng(11)
    seen = set()
    for name, t in tensors.items():
        if t.tensor_type.name in seen or len(t.shape) != 2 or t.name.startswith(("token_embd", "output")):
            continue
        seen.add(t.tensor_type.name)
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        rows = min(n_out, 256)  # the first rows are enough
        raw_all = np.ascontiguousarray(t.data).view(np.uint8).reshape(n_out, -1)
        raw = np.ascontiguousarray(raw_all[:rows]).reshape(-1)
        W = gguf_dequantize(raw_all[:rows], t.tensor_type).astype(np.float64).reshape(rows, n_in)
        x = make_acts(rng, 20, n_in)
        y = _orcd.matmul(int(t.tensor_type), raw, n_in, rows, x, n_threads=2)
        ref = x.astype(np.float64) @ W.T
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < 5e-4, f"{name} ({t.tensor_type.name}): relative error {rel}"
        y1 = _orcd.matmul(int(t.tensor_type), raw, n_in, rows, x[:1], n_threads=2)
        rel1 = np.linalg.norm(y1[0] - ref[0]) / np.linalg.norm(ref[0])
        assert rel1 < 5e-4, f"{name} ({t.tensor_type.name}) m=1: relative error {rel1}"
    assert {"Q5_0", "Q8_0", "Q6_K"} <= seen
