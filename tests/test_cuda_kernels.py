"""Each CUDA kernel of orcd._orcd_cuda against its CPU twin.

Twins: the CPU dequantization (orcd._orcd.dequantize_raw, else gguf.quants,
which it matches bitwise), float64 NumPy for products, norms, RoPE and
attention. Inputs are random (fresh per case), of several sizes including odd
ones, for every weight type; the entry points poison their outputs with NaN
before the kernel runs, so an unwritten element fails the comparison.

Skipped as a whole when the CUDA module is not built or no usable GPU is present.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

try:
    from orcd import _orcd_cuda as cu
except ImportError as e:  # built without CUDA, or the package is not installed
    pytest.skip(f"orcd._orcd_cuda is not available: {e}", allow_module_level=True)

_status = cu.cuda_status()
if _status:
    pytest.skip(f"no usable CUDA GPU: {_status}", allow_module_level=True)

try:
    from orcd import _orcd as core
except ImportError:
    core = None

# id, block size, block bytes, byte offsets of fp16 scale fields in a block
TYPES = {
    "F32": (0, 1, 4, ()),
    "F16": (1, 1, 2, ()),
    "BF16": (30, 1, 2, ()),
    "Q4_0": (2, 32, 18, (0,)),
    "Q4_1": (3, 32, 20, (0, 2)),
    "Q5_0": (6, 32, 22, (0,)),
    "Q5_1": (7, 32, 24, (0, 2)),
    "Q8_0": (8, 32, 34, (0,)),
    "Q2_K": (10, 256, 84, (80, 82)),
    "Q3_K": (11, 256, 110, (108,)),
    "Q4_K": (12, 256, 144, (0, 2)),
    "Q5_K": (13, 256, 176, (0, 2)),
    "Q6_K": (14, 256, 210, (208,)),
}
ALL_TYPES = list(TYPES)
# The types of Qwen2.5-0.5B-Instruct Q4_K_M plus the plain ones come first in
# the parametrisations below; every type is covered.


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test case (stable across runs and processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_weights(rng, tname: str, n_rows: int, n_in: int) -> np.ndarray:
    """uint8 bytes of n_rows rows of n_in elements of type tname: random quant
    bytes with random normal-range fp16 scales, or random floats."""
    tid, bs, bb, scales = TYPES[tname]
    assert n_in % bs == 0
    if tname == "F32":
        return rng.standard_normal(n_rows * n_in).astype(np.float32).view(np.uint8)
    if tname == "F16":
        return rng.standard_normal(n_rows * n_in).astype(np.float16).view(np.uint8)
    if tname == "BF16":
        f = rng.standard_normal(n_rows * n_in).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    nb = n_rows * n_in // bs
    blocks = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for off in scales:
        mag = rng.uniform(0.002, 0.05, nb) * rng.choice([-1.0, 1.0], nb)
        blocks[:, off:off + 2] = mag.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return blocks.reshape(-1)


def cpu_dequant(tname: str, data: np.ndarray, n: int) -> np.ndarray:
    tid = TYPES[tname][0]
    if core is not None and hasattr(core, "dequantize_raw"):
        return np.asarray(core.dequantize_raw(tid, data, n), dtype=np.float32)
    from gguf import quants
    from gguf.constants import GGMLQuantizationType
    qt = GGMLQuantizationType(tid)
    if tname == "F32":
        return data.view(np.float32)[:n].copy()
    if tname == "F16":
        return data.view(np.float16)[:n].astype(np.float32)
    if tname == "BF16":
        return (data.view(np.uint16)[:n].astype(np.uint32) << 16).view(np.float32)
    bs, bb = TYPES[tname][1:3]
    return quants.dequantize(data[: n // bs * bb].reshape(-1, bb), qt).reshape(-1)[:n].astype(np.float32)


def rel_err(a, ref, scale=None) -> float:
    """||a - ref|| / ||scale|| (scale defaults to ref). For products, scale is
    |W|·|x|, the size of the terms, so cancellation in a sum does not inflate
    the error of an accurate result."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert np.all(np.isfinite(a)), f"{np.count_nonzero(~np.isfinite(a))} non-finite outputs (unwritten?)"
    scale = ref if scale is None else np.asarray(scale, dtype=np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(scale), 1e-30))


def sizes_for(tname: str):
    bs = TYPES[tname][1]
    if bs == 1:
        return [1, 7, 64, 129, 1000]
    return [bs, 3 * bs, 7 * bs]


# ------------------------------------------------------------------ status / info

def test_cuda_status_and_device_info():
    assert cu.cuda_status() == ""
    d = cu.device_info()
    assert d["sm_count"] > 0 and d["total_memory"] > 0 and d["free_memory"] > 0
    assert isinstance(d["name"], str) and d["name"]


# ------------------------------------------------------------------ dequantize to fp16

@pytest.mark.parametrize("tname", ALL_TYPES)
def test_dequantize_f16_bitwise(tname):
    """fp16 output == float16(CPU float32 dequantization), bit for bit, incl. a size
    that needs several grid-stride rounds."""
    bs = TYPES[tname][1]
    for n_blocks in (1, 5, 33, 70001 if bs == 1 else 4099):
        n = n_blocks * bs if bs > 1 else n_blocks
        rng = rng_for("dq", tname, n)
        data = random_weights(rng, tname, 1, n)
        got = cu.dequantize_f16(TYPES[tname][0], data, n)
        assert got.dtype == np.float16 and got.shape == (n,)
        ref = cpu_dequant(tname, data, n).astype(np.float16)
        assert not np.isnan(got).any(), f"{tname} n={n}: NaN left (unwritten output)"
        bad = np.nonzero(got.view(np.uint16) != ref.view(np.uint16))[0]
        assert bad.size == 0, (f"{tname} n={n}: {bad.size} mismatches, first at {bad[0]}: "
                               f"gpu {got[bad[0]]} cpu {ref[bad[0]]}")


def test_dequantize_rejects_partial_blocks():
    with pytest.raises(ValueError, match="block"):
        cu.dequantize_f16(TYPES["Q4_K"][0], np.zeros(144, np.uint8), 100)


# ------------------------------------------------------------------ products

def _ref_product(tname, w, n_in, n_out, x, bias=None, y0=None):
    """(float64 x·Wᵀ (+ bias) (+ y0), |x|·|W|ᵀ (+ |bias|) (+ |y0|)): the result and the size of its terms."""
    W = cpu_dequant(tname, w, n_in * n_out).reshape(n_out, n_in).astype(np.float64)
    xd = np.asarray(x, np.float64).reshape(-1, n_in)
    y, mag = xd @ W.T, np.abs(xd) @ np.abs(W).T
    if bias is not None:
        y, mag = y + bias, mag + np.abs(bias)
    if y0 is not None:
        y, mag = y + y0, mag + np.abs(y0)
    return y, mag


@pytest.mark.parametrize("tname", ALL_TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_matvec(tname, m):
    """The decode mat-vec (quantized blocks read directly) against float64."""
    for n_in in sizes_for(tname):
        for n_out in (1, 5, 67):
            rng = rng_for("mv", tname, m, n_in, n_out)
            w = random_weights(rng, tname, n_out, n_in)
            x = rng.standard_normal((m, n_in)).astype(np.float32)
            got = cu.matvec(TYPES[tname][0], w, n_in, n_out, x)
            ref, mag = _ref_product(tname, w, n_in, n_out, x)
            assert got.shape == (m, n_out)
            e = rel_err(got, ref, mag)
            assert e < 1e-5, f"{tname} m={m} n_in={n_in} n_out={n_out}: rel err {e:.2e}"


@pytest.mark.parametrize("tname", ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "F16", "F32"])
def test_matvec_bias_and_accumulate(tname):
    """Bias add and the residual add (accumulate into y) of the mat-vec epilogue."""
    bs = TYPES[tname][1]
    n_in, n_out, m = max(bs, 64) * 2, 129, 3
    rng = rng_for("mvb", tname)
    w = random_weights(rng, tname, n_out, n_in)
    x = rng.standard_normal((m, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((m, n_out)).astype(np.float32)
    got = cu.matvec(TYPES[tname][0], w, n_in, n_out, x, bias=b, y=y0)
    e = rel_err(got, *_ref_product(tname, w, n_in, n_out, x, b, y0))
    assert e < 1e-5, f"{tname}: rel err {e:.2e}"


def test_matvec_large_real_shapes():
    """Qwen2.5-0.5B shapes: ffn_down Q6_K/Q4_K 4864 -> 896, attn Q5_0 896 -> 896, lm_head Q8_0."""
    for tname, n_in, n_out in (("Q6_K", 4864, 896), ("Q4_K", 4864, 896), ("Q5_0", 896, 896),
                               ("Q8_0", 896, 151936 // 8), ("Q4_K", 2048, 4864)):
        rng = rng_for("mvr", tname, n_in, n_out)
        w = random_weights(rng, tname, n_out, n_in)
        x = rng.standard_normal((1, n_in)).astype(np.float32)
        got = cu.matvec(TYPES[tname][0], w, n_in, n_out, x)
        e = rel_err(got, *_ref_product(tname, w, n_in, n_out, x))
        assert e < 1e-5, f"{tname} {n_in}x{n_out}: rel err {e:.2e}"


def test_matvec_matches_cpu_matmul():
    """Same product as the CPU engine's matmul (orcd._orcd.matmul), where available."""
    if core is None or not hasattr(core, "matmul"):
        pytest.skip("orcd._orcd.matmul not available")
    for tname in ("Q4_K", "Q5_0", "Q6_K", "Q8_0", "F16", "F32"):
        bs = TYPES[tname][1]
        n_in, n_out = max(bs, 32) * 4, 77
        rng = rng_for("mvcpu", tname)
        w = random_weights(rng, tname, n_out, n_in)
        x = rng.standard_normal((2, n_in)).astype(np.float32)
        got = cu.matvec(TYPES[tname][0], w, n_in, n_out, x)
        cpu = np.asarray(core.matmul(TYPES[tname][0], w, n_in, n_out, x))
        # The CPU kernels quantize the activations to integer codes, so they sit
        # further from the exact product than the GPU, which keeps x in float32.
        exact, mag = _ref_product(tname, w, n_in, n_out, x)
        e = rel_err(got, cpu, mag)
        assert e < 2e-2, f"{tname}: GPU vs CPU matmul rel err {e:.2e}"
        assert rel_err(got, exact, mag) <= rel_err(cpu, exact, mag) + 1e-6


DEC_INT8 = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K")


def _dec_codes(x):
    """The fused decode kernels' activations: per 32-element chunk, with
    id = 127/max|x| and d = max|x|/127 (float32), q1 = rint(x*id) and
    q2 = rint((x - q1*d)*id*256) clipped to +-127, each product rounded on its
    own like the kernel: x is read as d*(q1 + q2/256)."""
    xc = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(xc).max(axis=1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q1 = np.rint((xc * idv).astype(np.float32)).astype(np.float32)
    r = (xc - (q1 * d).astype(np.float32)).astype(np.float32)
    q2 = np.clip(np.rint(((r * idv).astype(np.float32) * np.float32(256)).astype(np.float32)), -127, 127)
    return (d.astype(np.float64) * (q1 + q2 / 256.0)).reshape(-1)


@pytest.mark.parametrize("tname", ALL_TYPES)
def test_dec_matvec(tname):
    """The fused decode mat-vec (lm_head mode: staged rows, int8 code planes for
    Q4_0/Q5_0/Q8_0/Q4_K/Q6_K, float32 for the others) against float64, with and
    without the fused rmsnorm; its device argmax is the first maximum of its output."""
    tid, bs = TYPES[tname][0], TYPES[tname][1]
    n_ins = [256, 768] if bs == 256 else [32, 96, 896]
    for n_in in n_ins:
        for n_out in (1, 5, 67, 1000):
            rng = rng_for("dec", tname, n_in, n_out)
            w = random_weights(rng, tname, n_out, n_in)
            x = (rng.standard_normal(n_in) * rng.uniform(0.1, 3.0, n_in)).astype(np.float32)
            W = cpu_dequant(tname, w, n_in * n_out).reshape(n_out, n_in).astype(np.float64)
            y, arg = cu.dec_matvec(tid, w, n_in, n_out, x)
            assert y.shape == (n_out,)
            exact, mag = W @ x.astype(np.float64), np.abs(W) @ np.abs(x.astype(np.float64))
            e = rel_err(y, exact, mag)
            assert e < 2e-5, f"{tname} {n_in}x{n_out}: rel err {e:.2e} vs float64"
            if tname in DEC_INT8 and tname != "Q4_K":  # the codes' product (Q4_K's min term uses the float sum)
                e = rel_err(y, W @ _dec_codes(x), mag)
                assert e < 5e-6, f"{tname} {n_in}x{n_out}: rel err {e:.2e} vs the code product"
            assert arg == int(np.argmax(y)), f"{tname} {n_in}x{n_out}: argmax {arg}, expected {np.argmax(y)}"
            # with the rmsnorm in front
            nw = rng.uniform(0.5, 1.5, n_in).astype(np.float32)
            y2, arg2 = cu.dec_matvec(tid, w, n_in, n_out, x, norm_w=nw, eps=1e-6)
            xd = x.astype(np.float64)
            xn = xd / np.sqrt((xd * xd).mean() + 1e-6) * nw
            e = rel_err(y2, W @ xn, np.abs(W) @ np.abs(xn))
            assert e < 2e-5, f"{tname} {n_in}x{n_out} (rmsnorm): rel err {e:.2e}"
            assert arg2 == int(np.argmax(y2))


def test_dec_matvec_lm_head_shape():
    """Qwen2.5-0.5B's lm_head shape class (Q8_0, 896 inputs, many blocks of rows):
    the argmax over thousands of per-block results, ties broken to the first index."""
    tid = TYPES["Q8_0"][0]
    n_in, n_out = 896, 151936 // 4
    rng = rng_for("declm")
    w = random_weights(rng, "Q8_0", n_out, n_in)
    x = rng.standard_normal(n_in).astype(np.float32)
    y, arg = cu.dec_matvec(tid, w, n_in, n_out, x)
    W = cpu_dequant("Q8_0", w, n_in * n_out).reshape(n_out, n_in).astype(np.float64)
    assert rel_err(y, W @ x, np.abs(W) @ np.abs(x)) < 2e-5
    assert arg == int(np.argmax(y))
    # a tie: copy the winning row to an earlier and a later place; the first copy wins
    rb = len(w) // n_out
    rows = w.reshape(n_out, rb).copy()
    win = int(np.argmax(y))
    rows[3] = rows[win]
    rows[n_out - 2] = rows[win]
    y, arg = cu.dec_matvec(tid, rows.reshape(-1), n_in, n_out, x)
    assert arg == min(win, 3)


@pytest.mark.parametrize("tname", ALL_TYPES)
def test_gemm_prompt_path(tname):
    """Dequantize to fp16 + cublasGemmEx (fp16 inputs, fp32 accumulate): error at
    fp16 rounding of x and W; also with W dequantized in row chunks, with bias
    and with accumulation into y."""
    bs = TYPES[tname][1]
    for m, n_in, n_out, chunk in ((1, sizes_for(tname)[1], 67, 0), (9, sizes_for(tname)[-1], 130, 7),
                                  (37, 2 * max(bs, 64), 33, 0)):
        rng = rng_for("gemm", tname, m, n_in, n_out)
        w = random_weights(rng, tname, n_out, n_in)
        x = rng.standard_normal((m, n_in)).astype(np.float32)
        b = rng.standard_normal(n_out).astype(np.float32)
        y0 = rng.standard_normal((m, n_out)).astype(np.float32)
        got = cu.gemm(TYPES[tname][0], w, n_in, n_out, x, chunk_rows=chunk)
        e = rel_err(got, *_ref_product(tname, w, n_in, n_out, x))
        assert e < 2e-3, f"{tname} m={m} n_in={n_in} n_out={n_out} chunk={chunk}: rel err {e:.2e}"
        got = cu.gemm(TYPES[tname][0], w, n_in, n_out, x, bias=b, y=y0, chunk_rows=chunk)
        e = rel_err(got, *_ref_product(tname, w, n_in, n_out, x, b, y0))
        assert e < 2e-3, f"{tname} (bias, accumulate): rel err {e:.2e}"


# ------------------------------------------------------------------ embedding rows

@pytest.mark.parametrize("tname", ALL_TYPES)
def test_get_rows(tname):
    n_in = sizes_for(tname)[1]
    n_rows = 50
    rng = rng_for("rows", tname)
    w = random_weights(rng, tname, n_rows, n_in)
    ids = rng.integers(0, n_rows, 13).astype(np.int32)
    got = cu.get_rows(TYPES[tname][0], w, n_in, n_rows, ids)
    W = cpu_dequant(tname, w, n_rows * n_in).reshape(n_rows, n_in)
    np.testing.assert_array_equal(got, W[ids])


# ------------------------------------------------------------------ elementwise and norms

@pytest.mark.parametrize("rows,n", [(1, 7), (3, 64), (5, 896), (2, 4864), (64, 257)])
def test_rmsnorm(rows, n):
    rng = rng_for("rms", rows, n)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.1, 30)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    eps = 1e-6
    got = cu.rmsnorm(x, w, eps)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt((xd * xd).mean(axis=1, keepdims=True) + eps) * w
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("n_tok,n_heads,hd", [(1, 14, 64), (5, 2, 64), (7, 4, 16), (3, 3, 128), (2, 1, 6)])
def test_rope_neox(n_tok, n_heads, hd):
    rng = rng_for("rope", n_tok, n_heads, hd)
    x = rng.standard_normal((n_tok, n_heads, hd)).astype(np.float32)
    pos = rng.integers(0, 32768, n_tok).astype(np.int32)
    pos[0] = 0
    base = 1e6
    got = cu.rope(x, pos, base)
    half = hd // 2
    i = np.arange(half, dtype=np.float64)
    theta = pos[:, None].astype(np.float64) * base ** (-2.0 * i / hd)[None, :]  # [n_tok, half]
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    ref = np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    assert rel_err(got, ref) < 1e-6
    np.testing.assert_array_equal(got[0], x[0])  # position 0: no rotation


def test_swiglu_and_bias():
    rng = rng_for("swiglu")
    for n in (1, 33, 4864 * 3):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        gd = g.astype(np.float64)
        assert rel_err(cu.swiglu(g, u), gd / (1 + np.exp(-gd)) * u) < 1e-6
    for rows, n in ((1, 5), (7, 896), (3, 130)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        assert rel_err(cu.add_bias(x, b), x.astype(np.float64) + b) < 1e-7


# ------------------------------------------------------------------ attention

def _ref_attention(q, k, v, pos):
    n_q, n_head, hd = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv
    k16 = k.astype(np.float16).astype(np.float64)  # the cache holds fp16
    v16 = v.astype(np.float16).astype(np.float64)
    out = np.zeros(q.shape, np.float64)
    for t in range(n_q):
        L = int(pos[t]) + 1
        for h in range(n_head):
            kh = k16[:L, h // group, :]
            s = kh @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v16[:L, h // group, :]
    return out


@pytest.mark.parametrize("n_q,n_kv,n_head,n_head_kv,hd,mode,split", [
    (1, 1, 14, 2, 64, "decode", 0),        # first token
    (1, 1000, 14, 2, 64, "decode", 0),     # decode over a long cache, auto split
    (1, 1000, 14, 2, 64, "decode", 128),   # forced splits
    (1, 777, 4, 4, 128, "decode", 300),    # split length not a multiple of the tile
    (77, 77, 14, 2, 64, "prompt", 0),      # causal prompt
    (33, 600, 4, 2, 16, "prompt_tail", 0),  # prompt chunk after cached positions
    (9, 300, 8, 1, 256, "random", 0),      # scattered positions, head_dim 256
    (5, 40, 6, 3, 6, "random", 7),         # head_dim not a multiple of 8
])
def test_attention(n_q, n_kv, n_head, n_head_kv, hd, mode, split):
    rng = rng_for("attn", n_q, n_kv, n_head, hd, mode, split)
    q = rng.standard_normal((n_q, n_head, hd)).astype(np.float32)
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
    q *= 2.0  # sharper softmax
    got = cu.attention(q, k, v, pos, split_len=split)
    e = rel_err(got, _ref_attention(q, k, v, pos))
    assert e < 2e-5, f"rel err {e:.2e}"


def test_attention_splits_agree():
    """Every split length gives the same result (the merge of partial softmaxes)."""
    rng = rng_for("attn-splits")
    q = rng.standard_normal((3, 8, 64)).astype(np.float32) * 3
    k = rng.standard_normal((2000, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2000, 2, 64)).astype(np.float32)
    pos = np.array([1999, 1000, 3], np.int32)
    base = cu.attention(q, k, v, pos, split_len=100000)
    for s in (1, 64, 256, 999):
        assert rel_err(cu.attention(q, k, v, pos, split_len=s), base) < 1e-5
