"""Each CUDA kernel of orcd._orcd_cuda against its CPU twin.

Twins: the CPU dequantization (orcd._orcd.dequantize_raw, else gguf.quants,
which it matches bitwise), the CPU engine's named operations (orcd._orcd.cpu_ops_<name>,
cpp/cpu_ops.h: rmsnorm, add_bias, rope_neox, kv_append, attention, swiglu; the CUDA
entry point of each has the same name), and the float64 NumPy reference's helpers
(tests/reference_qwen2.py: rms_norm, rope_neox, gqa_attention, swiglu) for products,
norms, RoPE and attention. Inputs are random (fresh per case), of several sizes
including odd ones, for every weight type; the entry points poison their outputs
(and KV caches) with NaN before the kernel runs, so an unwritten element fails the
comparison.

Bounds (u32 = 2^-24, the float32 unit roundoff; h = 2^-11, fp16's; rel_err is
||got - ref|| / ||scale||, scale = the size of the terms, |W|·|x| for products):
  dequantize_f16  bitwise = float16(CPU dequantization).
  matvec          rel_err < 1e-5 (float32 dots of exact weights).
  gemm            rel_err < 2e-3 (x and W rounded to fp16 first: h per element).
  gemm_f16        rel_err < 1e-4: inputs already fp16, so the products are exact in
                  float32; only the fp32 accumulation over <= 1000 terms errs
                  (~sqrt(n) u32 with rounding, n u32 at worst if the tensor cores truncate).
  dec_matvec, dec_proj
                  rel_err < 2e-5: int8 code planes (x ~ d(q1 + q2/256), 16-bit codes,
                  ~1.5e-5 of a chunk's max) for Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K, float32 for the
                  others; GLU with the scale propagated through silu(g)*u.
  dec_qkv         q: rel_err < 2e-5 as dec_proj (RoPE is a rotation: it keeps the
                  norms); K/V caches: < 2e-5 + h (+ fp16 rounding of the stored value).
  rmsnorm         rel_err < 1e-6 (float32 sum of squares); rope_neox < 1e-6; each within
                  2e-6 of its CPU twin (both within 1e-6 of float64).
  *_f16 outputs   |got - ref| <= h|ref| + 4e-6 scale + 2^-25 per element (fp16 rounding of
                  a float32 value within a few u32 of the terms' size `scale`, |ref| for
                  rmsnorm and swiglu, |x0| + |x1| for a rotated pair; 2^-25 covers fp16
                  subnormals), and (rmsnorm_f16, swiglu_f16) within one fp16 step of the
                  CPU twin's float32 result rounded to fp16.
  f32_to_f16, kv_append, qkv_post's V cache
                  bitwise = NumPy's float16 rounding (round to nearest even) of the
                  float32 values.
  attention, dec_attn
                  rel_err < 2e-5 against float64 with the fp16-rounded K/V (float32
                  online softmax over splits); the CPU twin within 3e-5; two launches of
                  dec_attn on the same buffers bitwise equal.
  swiglu, add_bias
                  rel_err < 1e-6 (CPU twin within 2e-6) and < 1e-7 (CPU twin bitwise: one
                  float32 add).
  qkv_post        q: rel_err < 1e-6 (as rope_neox, after one float32 bias add), CPU twins
                  (add_bias, rope_neox) within 2e-6; K cache as the *_f16 outputs (against
                  float64 and against the CPU twins' float32); V cache
                  bitwise fp16(v + bv); the rows' k, v parts unchanged.

Skipped as a whole when the CUDA module is not built or no usable GPU is present.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()

from orcd import _orcd as core  # noqa: E402  (the CPU twins; built with every orcd)

from reference_qwen2 import gqa_attention, rms_norm, rope_neox, swiglu  # noqa: E402

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
    if hasattr(core, "dequantize_raw"):
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


def test_mxfp4_dequantize_and_matvec():
    """MXFP4 (gpt-oss's experts: E2M1 codes under an E8M0 exponent, 17-byte blocks, so rows
    start at odd addresses): the GPU's fp16 dequantization == float16 of the CPU's bit for bit
    (the CPU's is gguf's: tests/test_dequant.py), and the mat-vec against float64 of the
    CPU's dequantized weights."""
    tid, bs, bb = 39, 32, 17

    def blocks(rng, nb):
        b = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
        b[:, 0] = rng.integers(118, 134, size=nb)  # scales 2^-10 .. 2^5 (the E8M0 byte)
        return b.reshape(-1)

    for n_blocks in (1, 5, 4099):
        n = n_blocks * bs
        data = blocks(rng_for("mxfp4", n), n_blocks)
        got = cu.dequantize_f16(tid, data, n)
        ref = np.asarray(core.dequantize_raw(tid, data, n), np.float32).astype(np.float16)
        bad = np.nonzero(got.view(np.uint16) != ref.view(np.uint16))[0]
        assert bad.size == 0, f"n={n}: {bad.size} mismatches, first at {bad[0]}: gpu {got[bad[0]]} cpu {ref[bad[0]]}"
    for m in (1, 3, 8):
        for n_in, n_out in ((32, 5), (96, 67), (224, 3)):
            rng = rng_for("mxfp4-mv", m, n_in, n_out)
            w = blocks(rng, n_out * n_in // bs)
            x = rng.standard_normal((m, n_in)).astype(np.float32)
            got = cu.matvec(tid, w, n_in, n_out, x)
            wf = np.asarray(core.dequantize_raw(tid, w, n_out * n_in), np.float64).reshape(n_out, n_in)
            ref = x.astype(np.float64) @ wf.T
            e = rel_err(got, ref, np.abs(x.astype(np.float64)) @ np.abs(wf).T)
            assert e < 1e-5, f"m={m} n_in={n_in} n_out={n_out}: rel err {e:.2e}"


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


DEC_INT8 = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K")


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


@pytest.mark.parametrize("bulk", [False, True], ids=["cp_async", "bulk"])
@pytest.mark.parametrize("tname", ALL_TYPES)
def test_dec_matvec(tname, bulk):
    """The fused decode mat-vec (lm_head mode: staged rows, int8 code planes for
    Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K, float32 for the others) against float64, with and
    without the fused rmsnorm; its device argmax is the first maximum of its output.
    bulk: the rows staged by bulk copies on per-slot barriers (options' lm_bulk)."""
    tid, bs = TYPES[tname][0], TYPES[tname][1]
    n_ins = [256, 768] if bs == 256 else [32, 96, 896]
    for n_in in n_ins:
        for n_out in (1, 5, 67, 1000):
            rng = rng_for("dec", tname, n_in, n_out)
            w = random_weights(rng, tname, n_out, n_in)
            x = (rng.standard_normal(n_in) * rng.uniform(0.1, 3.0, n_in)).astype(np.float32)
            W = cpu_dequant(tname, w, n_in * n_out).reshape(n_out, n_in).astype(np.float64)
            y, arg = cu.dec_matvec(tid, w, n_in, n_out, x, bulk=bulk)
            assert y.shape == (n_out,)
            exact, mag = W @ x.astype(np.float64), np.abs(W) @ np.abs(x.astype(np.float64))
            e = rel_err(y, exact, mag)
            assert e < 2e-5, f"{tname} {n_in}x{n_out}: rel err {e:.2e} vs float64"
            if tname in DEC_INT8 and tname not in ("Q4_1", "Q4_K"):  # the codes' product (min terms: the float sum)
                e = rel_err(y, W @ _dec_codes(x), mag)
                assert e < 5e-6, f"{tname} {n_in}x{n_out}: rel err {e:.2e} vs the code product"
            assert arg == int(np.argmax(y)), f"{tname} {n_in}x{n_out}: argmax {arg}, expected {np.argmax(y)}"
            # with the rmsnorm in front
            nw = rng.uniform(0.5, 1.5, n_in).astype(np.float32)
            y2, arg2 = cu.dec_matvec(tid, w, n_in, n_out, x, norm_w=nw, eps=1e-6, bulk=bulk)
            xn = rms_norm(x.astype(np.float64), nw.astype(np.float64), 1e-6)
            e = rel_err(y2, W @ xn, np.abs(W) @ np.abs(xn))
            assert e < 2e-5, f"{tname} {n_in}x{n_out} (rmsnorm): rel err {e:.2e}"
            assert arg2 == int(np.argmax(y2))


@pytest.mark.parametrize("bulk", [False, True], ids=["cp_async", "bulk"])
def test_dec_matvec_lm_head_shape(bulk):
    """Qwen2.5-0.5B's lm_head shape class (Q8_0, 896 inputs, many blocks of rows):
    the argmax over thousands of per-block results, ties broken to the first index
    (bulk: each warp's ring wraps many times on its barriers' alternating phases)."""
    tid = TYPES["Q8_0"][0]
    n_in, n_out = 896, 151936 // 4
    rng = rng_for("declm")
    w = random_weights(rng, "Q8_0", n_out, n_in)
    x = rng.standard_normal(n_in).astype(np.float32)
    y, arg = cu.dec_matvec(tid, w, n_in, n_out, x, bulk=bulk)
    W = cpu_dequant("Q8_0", w, n_in * n_out).reshape(n_out, n_in).astype(np.float64)
    assert rel_err(y, W @ x, np.abs(W) @ np.abs(x)) < 2e-5
    assert arg == int(np.argmax(y))
    # a tie: copy the winning row to an earlier and a later place; the first copy wins
    rb = len(w) // n_out
    rows = w.reshape(n_out, rb).copy()
    win = int(np.argmax(y))
    rows[3] = rows[win]
    rows[n_out - 2] = rows[win]
    y, arg = cu.dec_matvec(tid, rows.reshape(-1), n_in, n_out, x, bulk=bulk)
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
    ref = rms_norm(x.astype(np.float64), w.astype(np.float64), eps)
    assert rel_err(got, ref) < 1e-6
    # the CPU twin: double sum of squares, both within 1e-6 of float64
    assert rel_err(got, core.cpu_ops_rmsnorm(x, w, eps)) < 2e-6


@pytest.mark.parametrize("n_tok,n_heads,hd", [(1, 14, 64), (5, 2, 64), (7, 4, 16), (3, 3, 128), (2, 1, 6)])
def test_rope_neox(n_tok, n_heads, hd):
    rng = rng_for("rope", n_tok, n_heads, hd)
    x = rng.standard_normal((n_tok, n_heads, hd)).astype(np.float32)
    pos = rng.integers(0, 32768, n_tok).astype(np.int32)
    pos[0] = 0
    base = 1e6
    got = cu.rope_neox(x, pos, base)
    ref = rope_neox(x.astype(np.float64), pos, base)
    assert rel_err(got, ref) < 1e-6
    np.testing.assert_array_equal(got[0], x[0])  # position 0: no rotation
    assert rel_err(got, core.cpu_ops_rope_neox(x, pos, base)) < 2e-6


def test_swiglu_and_bias():
    rng = rng_for("swiglu")
    for n in (1, 33, 4864 * 3):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        got = cu.swiglu(g, u)
        assert rel_err(got, swiglu(g.astype(np.float64), u.astype(np.float64))) < 1e-6
        assert rel_err(got, core.cpu_ops_swiglu(g, u)) < 2e-6
    for rows, n in ((1, 5), (7, 896), (3, 130)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        got = cu.add_bias(x, b)
        assert rel_err(got, x.astype(np.float64) + b) < 1e-7
        # one float32 add each: bitwise
        np.testing.assert_array_equal(got, core.cpu_ops_add_bias(x, b))


def _gelu_tanh_gate(g, u):
    k = np.sqrt(2.0 / np.pi)
    return 0.5 * g * (1.0 + np.tanh(k * (g + 0.044715 * g ** 3))) * u


def test_gemma3_ops():
    """gemma3's kernels against float64 NumPy and their CPU twins: the in-place row norm
    (a warp a row up to 256, a block a row above: the per-head Q/K norms and the post-norms)
    and the GELU(tanh) gate."""
    rng = rng_for("gemma3 ops")
    for rows, n in ((1, 16), (7, 64), (300, 256), (5, 257), (9, 640), (3, 1152)):
        x = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
        w = (1 + rng.standard_normal(n) * 0.1).astype(np.float32)
        got = cu.rmsnorm_rows(x, w, 1e-6)
        x64 = x.astype(np.float64)
        ref = x64 / np.sqrt((x64 * x64).mean(1, keepdims=True) + 1e-6) * w
        assert rel_err(got, ref) < 1e-6, (rows, n)
        assert rel_err(got, core.cpu_ops_rmsnorm(x, w, 1e-6)) < 2e-6, (rows, n)
    for n in (1, 33, 2048 * 3):
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        u = rng.standard_normal(n).astype(np.float32)
        got = cu.geglu_tanh(g, u)
        assert rel_err(got, _gelu_tanh_gate(g.astype(np.float64), u.astype(np.float64))) < 1e-6
        assert rel_err(got, core.cpu_ops_geglu_tanh(g, u)) < 2e-6


def _sink_attention(q, k, v, pos, window, sinks):
    """float64 attention of cpu_ops::attention_window over the fp16-rounded K/V: query t sees
    keys (pos[t] - window, pos[t]] (window 0: all up to pos[t]); head h's sink joins the max and
    the denominator with no value."""
    k16 = k.astype(np.float16).astype(np.float64)
    v16 = v.astype(np.float16).astype(np.float64)
    n_q, n_head, hd = q.shape
    group = n_head // k.shape[1]
    out = np.zeros(q.shape)
    for t in range(n_q):
        lo = max(0, pos[t] - window + 1) if window > 0 else 0
        for h in range(n_head):
            s = k16[lo:pos[t] + 1, h // group] @ q[t, h].astype(np.float64) / np.sqrt(hd)
            m = max(s.max(), sinks[h]) if sinks is not None else s.max()
            e = np.exp(s - m)
            den = e.sum() + (np.exp(sinks[h] - m) if sinks is not None else 0.0)
            out[t, h] = (e / den) @ v16[lo:pos[t] + 1, h // group]
    return out


def test_gptoss_ops():
    """gpt-oss's kernels against float64 NumPy: the clamped gate (values past the limit on both
    sides), RoPE from a frequency table with the magnitude factor (both pairings), and attention
    with sinks and windows (GQA 2 and 7, head_dim 16 / 64 / 256, the keys in slot 1 of a cache whose
    other slots are NaN)."""
    rng = rng_for("gpt-oss ops")
    for n in (1, 37, 3 * 4096):
        g = (rng.standard_normal(n) * 6).astype(np.float32)
        u = (rng.standard_normal(n) * 6).astype(np.float32)
        got = cu.swiglu_oai(g, u, 1.702, 7.0)
        x = np.minimum(g.astype(np.float64), 7.0)
        y = np.clip(u.astype(np.float64), -7.0, 7.0)
        assert rel_err(got, x / (1 + np.exp(-1.702 * x)) * (y + 1)) < 1e-6, n
    for neox in (True, False):
        n_tok, n_heads, hd = 5, 3, 16
        x = rng.standard_normal((n_tok, n_heads, hd)).astype(np.float32)
        pos = np.array([0, 1, 7, 300, 4095], np.int32)
        inv = np.exp(-rng.uniform(0, 9, hd // 2))
        got = cu.rope_freqs(x, pos, inv, 1.3, neox)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cs, sn = np.cos(ang)[:, None, :] * 1.3, np.sin(ang)[:, None, :] * 1.3
        x64 = x.astype(np.float64)
        a, b = (x64[..., : hd // 2], x64[..., hd // 2:]) if neox else (x64[..., 0::2], x64[..., 1::2])
        ra, rb = a * cs - b * sn, a * sn + b * cs
        ref = np.concatenate([ra, rb], -1) if neox else np.stack([ra, rb], -1).reshape(x.shape)
        assert rel_err(got, ref) < 1e-6, neox
    for n_head, n_head_kv, hd, n_kv in ((4, 2, 16, 40), (14, 2, 64, 300), (8, 1, 256, 20), (7, 1, 64, 129)):
        q = rng.standard_normal((6, n_head, hd)).astype(np.float32)
        k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
        v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
        pos = np.array(sorted(rng.choice(n_kv, size=6, replace=False)), np.int32)
        for window in (0, 3, 128):
            for sinks in (None, (rng.standard_normal(n_head) * 2).astype(np.float32)):
                got = cu.attention_sinks(q, k, v, pos, window, sinks)
                ref = _sink_attention(q, k, v, pos, window, sinks)
                e = rel_err(got, ref)
                assert e < 2e-5, (n_head, n_head_kv, hd, window, sinks is not None, e)
    with pytest.raises(ValueError, match="sinks must be"):
        cu.attention_sinks(q, k, v, pos, 0, np.zeros(n_head + 1, np.float32))


# ------------------------------------------------------------------ attention

def _ref_attention(q, k, v, pos):
    """float64 attention over the fp16-rounded K/V (the cache holds fp16)."""
    k16 = k.astype(np.float16).astype(np.float64)
    v16 = v.astype(np.float16).astype(np.float64)
    return gqa_attention(q.astype(np.float64), k16, v16, pos)


def _cpu_attention(q, k, v, pos):
    """The CPU twin (kv_append + attention) on the fp16-rounded K/V, one slot."""
    n_kv, n_head_kv, hd = k.shape
    kt = np.full((1, n_head_kv, hd, n_kv), np.nan, np.float32)
    vc = np.full((1, n_kv, n_head_kv * hd), np.nan, np.float32)
    k16 = k.astype(np.float16).astype(np.float32)
    v16 = v.astype(np.float16).astype(np.float32)
    core.cpu_ops_kv_append(kt, vc, k16, v16, np.zeros(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    return core.cpu_ops_attention(q, kt, vc, np.zeros(len(pos), np.int32), np.asarray(pos, np.int32))


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
    e = rel_err(got, _cpu_attention(q, k, v, pos))
    assert e < 3e-5, f"rel err {e:.2e} against the CPU twin"


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


# ------------------------------------------------------------------ fp16 helpers

H = 2.0 ** -11  # fp16 unit roundoff
F16_SUB = 2.0 ** -25  # half of fp16's smallest subnormal step


def assert_f16_close(got, ref64, scale=None, rel=4e-6, what=""):
    """got (float16) is ref64 rounded to fp16 after a float32 error of at most rel·scale
    (scale: the size of the terms, |ref| by default): per element
    |got - ref| <= h|ref| + rel·scale + 2^-25, and nothing left NaN."""
    ref64 = np.asarray(ref64, np.float64)
    scale = np.abs(ref64) if scale is None else np.asarray(scale, np.float64)
    g = np.asarray(got).astype(np.float64)
    assert np.all(np.isfinite(g)), f"{what}: {np.count_nonzero(~np.isfinite(g))} non-finite outputs (unwritten?)"
    bad = np.abs(g - ref64) > H * np.abs(ref64) + rel * scale + F16_SUB
    assert not bad.any(), f"{what}: {np.count_nonzero(bad)} elements beyond fp16 rounding, first at {np.argmax(bad)}"


def assert_within_f16_ulp(got, twin32, what=""):
    """got (float16) within one fp16 step of the twin's float32 result rounded to fp16."""
    t16 = np.asarray(twin32, np.float32).astype(np.float16)
    step = np.spacing(np.abs(t16)).astype(np.float64)
    d = np.abs(np.asarray(got).astype(np.float64) - t16.astype(np.float64))
    assert np.all(d <= step), f"{what}: {np.count_nonzero(d > step)} elements more than one fp16 step from the twin"


# ------------------------------------------------------------------ KV append and the fused prompt kernels

def _cpu_cache(n_slots, n_ctx, n_head_kv, hd, k, v, slots, pos):
    """The CPU twin's caches after kv_append, as [n_slots, n_ctx, n_head_kv, hd] (K untransposed)."""
    kt = np.full((n_slots, n_head_kv, hd, n_ctx), np.nan, np.float32)
    vc = np.full((n_slots, n_ctx, n_head_kv * hd), np.nan, np.float32)
    core.cpu_ops_kv_append(kt, vc, k, v, slots, pos)
    return kt.transpose(0, 3, 1, 2), vc.reshape(n_slots, n_ctx, n_head_kv, hd)


def test_kv_append():
    """The KV-store kernel: token t's rows go to (slots[t], pos[t]) as fp16 (bitwise the
    float16 rounding of the CPU twin's float32 cache); every other entry stays NaN."""
    rng = rng_for("kv_append")
    n_slots, n_ctx, n_head_kv, hd = 3, 11, 2, 64
    pairs = rng.permutation(n_slots * n_ctx)[:9]  # distinct (slot, pos)
    slots, pos = (pairs // n_ctx).astype(np.int32), (pairs % n_ctx).astype(np.int32)
    k = (rng.standard_normal((9, n_head_kv, hd)) * 3).astype(np.float32)
    v = (rng.standard_normal((9, n_head_kv, hd)) * 3).astype(np.float32)
    kc, vc = cu.kv_append(k, v, slots, pos, n_slots, n_ctx)
    assert kc.shape == (n_slots, n_ctx, n_head_kv, hd)
    ck, cv = _cpu_cache(n_slots, n_ctx, n_head_kv, hd, k, v, slots, pos)
    written = np.zeros((n_slots, n_ctx), bool)
    written[slots, pos] = True
    np.testing.assert_array_equal(kc[written], ck[written].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(vc[written], cv[written].astype(np.float16).astype(np.float32))
    assert np.isnan(kc[~written]).all() and np.isnan(vc[~written]).all()
    with pytest.raises(ValueError, match="pos 11 out of range"):
        cu.kv_append(k[:1], v[:1], np.array([0], np.int32), np.array([11], np.int32), n_slots, n_ctx)


@pytest.mark.parametrize("n_tok,n_head,n_head_kv,hd,biases", [
    (1, 14, 2, 64, True),    # Qwen2.5-0.5B, one token
    (40, 14, 2, 64, True),   # a prompt chunk
    (7, 4, 4, 128, False),   # no biases
    (5, 3, 1, 6, True),      # odd sizes
])
def test_qkv_post(n_tok, n_head, n_head_kv, hd, biases):
    """Bias + NEOX RoPE + KV append in one kernel against the CPU twins in sequence
    (add_bias, rope_neox, kv_append) and float64: q roped in place, k roped into the
    cache, v (+ bias) into the cache; the rows' k and v parts are left as they were."""
    rng = rng_for("qkv_post", n_tok, n_head, hd, biases)
    qd, kd = n_head * hd, n_head_kv * hd
    n_slots, n_ctx = 2, (40000 if kd <= 128 else 3000)  # positions past 32768 where the caches stay small
    qkv = (rng.standard_normal((n_tok, qd + 2 * kd)) * 2).astype(np.float32)
    bq, bk, bv = (rng.standard_normal(d).astype(np.float32) if biases else None for d in (qd, kd, kd))
    pos = rng.integers(0, n_ctx, n_tok).astype(np.int32)
    pos[0] = 0
    slots = rng.integers(0, n_slots, n_tok).astype(np.int32)
    _, uniq = np.unique(slots.astype(np.int64) * n_ctx + pos, return_index=True)
    keep = np.sort(uniq)  # distinct (slot, pos): each entry has one writer
    qkv, pos, slots, n_tok = qkv[keep], pos[keep], slots[keep], len(keep)
    base = 1e6
    got, kc, vc = cu.qkv_post(qkv, n_head, n_head_kv, hd, pos, slots, base, n_slots, n_ctx, bq=bq, bk=bk, bv=bv)
    assert got.shape == qkv.shape and kc.shape == (n_slots, n_ctx, kd)
    zero = lambda d: np.zeros(d, np.float32)  # noqa: E731
    bq, bk, bv = (b if b is not None else zero(d) for b, d in ((bq, qd), (bk, kd), (bv, kd)))
    q, k, v = qkv[:, :qd], qkv[:, qd:qd + kd], qkv[:, qd + kd:]
    # the CPU twins in the engine's order
    q_cpu = core.cpu_ops_rope_neox(core.cpu_ops_add_bias(q, bq).reshape(n_tok, n_head, hd), pos, base)
    k_cpu = core.cpu_ops_rope_neox(core.cpu_ops_add_bias(k, bk).reshape(n_tok, n_head_kv, hd), pos, base)
    v_cpu = core.cpu_ops_add_bias(v, bv).reshape(n_tok, n_head_kv, hd)
    ck, cv = _cpu_cache(n_slots, n_ctx, n_head_kv, hd, k_cpu, v_cpu, slots, pos)
    # float64
    q64 = rope_neox((q.astype(np.float64) + bq).reshape(n_tok, n_head, hd), pos, base)
    k64 = rope_neox((k.astype(np.float64) + bk).reshape(n_tok, n_head_kv, hd), pos, base)

    gq = got[:, :qd].reshape(n_tok, n_head, hd)
    assert rel_err(gq, q64) < 1e-6
    assert rel_err(gq, q_cpu) < 2e-6
    np.testing.assert_array_equal(got[:, qd:], qkv[:, qd:])
    written = np.zeros((n_slots, n_ctx), bool)
    written[slots, pos] = True
    gk = kc[written].reshape(-1, n_head_kv, hd)
    order = np.lexsort((pos, slots))  # rows of kc[written] come in (slot, pos) order
    # an element of a rotated pair can cancel to ~0: its float32 error is relative to the
    # pair's size |x0| + |x1|, not to itself
    kb = np.abs(k.astype(np.float64) + bk).reshape(n_tok, n_head_kv, 2, hd // 2)
    pair = np.concatenate([kb.sum(axis=2)] * 2, axis=-1)[order]
    assert_f16_close(gk, k64[order], scale=pair, what="K cache")
    assert_f16_close(gk, ck[written].reshape(-1, n_head_kv, hd), scale=pair, what="K cache vs CPU twin")
    np.testing.assert_array_equal(vc[written].reshape(-1, n_head_kv, hd),
                                  cv[written].astype(np.float16).astype(np.float32))  # one float add, then fp16
    assert np.isnan(kc[~written]).all() and np.isnan(vc[~written]).all()


@pytest.mark.parametrize("rows,n", [(1, 7), (3, 64), (5, 896), (2, 4864), (64, 257)])
def test_rmsnorm_f16(rows, n):
    rng = rng_for("rms16", rows, n)
    x = (rng.standard_normal((rows, n)) * rng.uniform(0.1, 30)).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    got = cu.rmsnorm_f16(x, w, 1e-6)
    assert got.dtype == np.float16 and got.shape == (rows, n)
    assert_f16_close(got, rms_norm(x.astype(np.float64), w.astype(np.float64), 1e-6), what="rmsnorm_f16")
    assert_within_f16_ulp(got, core.cpu_ops_rmsnorm(x, w, 1e-6), what="rmsnorm_f16 vs CPU twin")


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 33), (9, 4864), (600, 130)])
def test_swiglu_f16(rows, n):
    rng = rng_for("swiglu16", rows, n)
    gu = (rng.standard_normal((rows, 2 * n)) * 3).astype(np.float32)
    got = cu.swiglu_f16(gu)
    assert got.dtype == np.float16 and got.shape == (rows, n)
    g, u = gu[:, :n], gu[:, n:]
    assert_f16_close(got, swiglu(g.astype(np.float64), u.astype(np.float64)), what="swiglu_f16")
    assert_within_f16_ulp(got, core.cpu_ops_swiglu(np.ascontiguousarray(g), np.ascontiguousarray(u)),
                          what="swiglu_f16 vs CPU twin")


def test_f32_to_f16():
    """Round to nearest even, bitwise as NumPy's float16: ordinary values, fp16
    subnormals, exact ties, overflow to inf, signed zeros, infinities; NaN stays NaN."""
    rng = rng_for("f32_to_f16")
    special = np.array([0.0, -0.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 65504.0, 65520.0, 65519.99, 1e6, -1e6,
                        2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -26, 6.1e-5, np.inf, -np.inf], np.float32)
    for n in (1, 17, 70001):
        x = np.concatenate([special, (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 5, n)).astype(np.float32)])
        got = cu.f32_to_f16(x)
        assert got.dtype == np.float16 and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint16), x.astype(np.float16).view(np.uint16))
    assert np.isnan(cu.f32_to_f16(np.array([np.nan], np.float32))).all()


@pytest.mark.parametrize("rows,n_in,n_out", [(1, 7, 5), (9, 896, 130), (37, 64, 896), (128, 1000, 67)])
def test_gemm_f16(rows, n_in, n_out):
    """cublasGemmEx on fp16 operands: the products are exact, so only the float32
    accumulation errs; with y it accumulates (beta = 1) into y."""
    rng = rng_for("gemm16", rows, n_in, n_out)
    a = rng.standard_normal((n_out, n_in)).astype(np.float16)
    x = (rng.standard_normal((rows, n_in)) * 2).astype(np.float16)
    ad, xd = a.astype(np.float64), x.astype(np.float64)
    ref, mag = xd @ ad.T, np.abs(xd) @ np.abs(ad).T
    got = cu.gemm_f16(a.view(np.uint16), x.view(np.uint16))
    assert got.shape == (rows, n_out)
    e = rel_err(got, ref, mag)
    assert e < 1e-4, f"rel err {e:.2e}"
    y0 = rng.standard_normal((rows, n_out)).astype(np.float32)
    got = cu.gemm_f16(a.view(np.uint16), x.view(np.uint16), y=y0)
    e = rel_err(got, ref + y0, mag + np.abs(y0))
    assert e < 1e-4, f"rel err {e:.2e} (accumulate)"


# ------------------------------------------------------------------ the fused decode step

def _fit_rows(rb, tname, n_in, n_tensors):
    """rows_per_block shrunk until n_tensors staged ranges fit 160 KB of shared memory
    (as the engine's plan does for long rows, e.g. float32 ones)."""
    row_bytes = n_in // TYPES[tname][1] * TYPES[tname][2]
    while rb > 1 and n_tensors * (rb * row_bytes + 48) > 160 * 1024:
        rb -= 1
    return rb


def _dequant_rows(tname, w, n_out, n_in):
    return cpu_dequant(tname, w, n_out * n_in).reshape(n_out, n_in).astype(np.float64)


def _n_embd_for(*tnames):
    """An n_embd every type's block divides (K-quants: 256), not a power of two where possible."""
    return 768 if any(TYPES[t][1] == 256 for t in tnames) else 896


@pytest.mark.parametrize("tq,tk,tv", [
    ("Q5_0", "Q5_0", "Q8_0"), ("Q4_K", "Q4_K", "Q6_K"), ("Q4_0", "Q4_0", "Q8_0"), ("Q5_K", "Q5_K", "Q6_K"),
    ("F16", "F16", "F16"), ("Q8_0", "Q8_0", "Q8_0"), ("Q4_K", "Q4_K", "Q4_K"), ("Q6_K", "Q6_K", "Q6_K"),
    ("F32", "F32", "F32"), ("BF16", "BF16", "BF16"), ("Q4_1", "Q4_1", "Q4_1"), ("Q3_K", "Q3_K", "Q3_K"),
    ("Q4_K", "Q8_0", "F16"),  # q and k of different types: the generic instance
])
def test_dec_qkv(tq, tk, tv):
    """rmsnorm -> q/k/v row dots + bias -> RoPE -> q out, K/V into slot 1 at pos, against
    float64 (the NumPy reference's rms_norm and rope_neox on the dequantized weights)."""
    n_embd = _n_embd_for(tq, tk, tv)
    n_head, n_head_kv, hd = 14, 2, 64
    qd, kd = n_head * hd, n_head_kv * hd
    n_slots, n_ctx, base, eps = 2, 5000, 1e6, 1e-6
    # S = 32 stages 64 rows per block: 2 x 32 float32 rows of 896 would not fit in shared memory
    s_max = 16 if "F32" in (tq, tk, tv) else 32
    for pos, slot, biases, S in ((0, 0, True, 0), (4321, 1, True, 0), (17, 1, False, 3), (999, 0, True, s_max)):
        rng = rng_for("dec_qkv", tq, tk, tv, pos)
        ws = [random_weights(rng, t, d, n_embd) for t, d in ((tq, qd), (tk, kd), (tv, kd))]
        x = (rng.standard_normal(n_embd) * rng.uniform(0.1, 3.0, n_embd)).astype(np.float32)
        nw = rng.uniform(0.5, 1.5, n_embd).astype(np.float32)
        bs = [rng.standard_normal(d).astype(np.float32) if biases else None for d in (qd, kd, kd)]
        q, kc, vc, xo = cu.dec_qkv(TYPES[tq][0], ws[0], TYPES[tk][0], ws[1], TYPES[tv][0], ws[2], n_embd, n_head,
                                   n_head_kv, hd, nw, eps, base, pos, slot, n_slots, n_ctx, x=x, bq=bs[0], bk=bs[1],
                                   bv=bs[2], rows_per_part=S)
        assert xo is None and q.shape == (qd,) and kc.shape == (n_slots, n_ctx, kd)
        h = rms_norm(x.astype(np.float64), nw.astype(np.float64), eps)
        ref, mag = [], []
        for t, w, b, d in zip((tq, tk, tv), ws, bs, (qd, kd, kd)):
            W = _dequant_rows(t, w, d, n_embd)
            ref.append(W @ h + (b if b is not None else 0.0))
            mag.append(np.abs(W) @ np.abs(h) + (np.abs(b) if b is not None else 0.0))
        pa = np.array([pos])
        rq = rope_neox(ref[0].reshape(1, n_head, hd), pa, base).reshape(-1)
        rk = rope_neox(ref[1].reshape(1, n_head_kv, hd), pa, base).reshape(-1)
        what = f"{tq}/{tk}/{tv} pos={pos} S={S}"
        e = rel_err(q, rq, mag[0])
        assert e < 2e-5, f"{what}: q rel err {e:.2e}"
        e = rel_err(kc[slot, pos], rk, mag[1])
        assert e < 2e-5 + H, f"{what}: K rel err {e:.2e}"
        e = rel_err(vc[slot, pos], ref[2], mag[2])
        assert e < 2e-5 + H, f"{what}: V rel err {e:.2e}"
        written = np.zeros((n_slots, n_ctx), bool)
        written[slot, pos] = True
        assert np.isnan(kc[~written]).all() and np.isnan(vc[~written]).all(), f"{what}: writes outside (slot, pos)"


@pytest.mark.parametrize("t_emb", ["F16", "Q8_0", "Q4_K", "Q6_K", "F32"])
def test_dec_qkv_embedding_input(t_emb):
    """Layer 0: the input is row `token` of the embedding (any type), which block 0 also
    writes to the residual stream: bitwise the CPU dequantization of that row."""
    n_embd, n_vocab, n_head, n_head_kv, hd = 768, 50, 4, 2, 64
    qd, kd = n_head * hd, n_head_kv * hd
    rng = rng_for("dec_qkv_emb", t_emb)
    emb = random_weights(rng, t_emb, n_vocab, n_embd)
    ws = [random_weights(rng, "Q4_K", d, n_embd) for d in (qd, kd, kd)]
    nw = rng.uniform(0.5, 1.5, n_embd).astype(np.float32)
    token, pos = 37, 5
    q, kc, vc, xo = cu.dec_qkv(12, ws[0], 12, ws[1], 12, ws[2], n_embd, n_head, n_head_kv, hd, nw, 1e-6, 1e4, pos, 0,
                               1, 8, emb_type=TYPES[t_emb][0], emb=emb, n_vocab=n_vocab, token=token)
    row = _dequant_rows(t_emb, emb, n_vocab, n_embd)[token]
    np.testing.assert_array_equal(xo, row.astype(np.float32))
    h = rms_norm(row, nw.astype(np.float64), 1e-6)
    W = _dequant_rows("Q4_K", ws[0], qd, n_embd)
    rq = rope_neox((W @ h).reshape(1, n_head, hd), np.array([pos]), 1e4).reshape(-1)
    assert rel_err(q, rq, np.abs(W) @ np.abs(h)) < 2e-5
    Wv = _dequant_rows("Q4_K", ws[2], kd, n_embd)
    assert rel_err(vc[0, pos], Wv @ h, np.abs(Wv) @ np.abs(h)) < 2e-5 + H


def _has_cc90() -> bool:
    return int(cu.device_info()["compute_capability"].split(".")[0]) >= 9


# (n_head/n_head_kv)*head_dim = 448, 1536, 768, 128, 32: the kernel's instances of 2, 8, 3, 1, 1
# outputs per thread (a group of 2048 would need more shared memory for the merge than a block has)
@pytest.mark.parametrize("n_head,n_head_kv,hd", [(14, 2, 64), (12, 1, 128), (12, 2, 128), (4, 4, 128), (8, 2, 8)])
@pytest.mark.parametrize("variant", ["cluster", "global"])
def test_dec_attn(n_head, n_head_kv, hd, variant):
    """The decode attention of one query at position n_kv-1 of slot 1 (slot 0 and later
    positions NaN: reading them would show), in both merge variants, against float64
    and the CPU twin; a second launch on the same buffers gives the same bits (the global
    merge's completion counters are reset by the kernel)."""
    cluster = variant == "cluster"
    if cluster and not _has_cc90():
        pytest.skip("the cluster attention needs compute capability 9.0")
    plans = ([dict(), dict(cluster_size=16), dict(cluster_mma=True), dict(cluster_size=16, cluster_mma=True),
              dict(cluster_size=3, cluster_mma=True), dict(cluster_size=16, cluster_mma=True, clusters=2),
              dict(cluster_size=8, cluster_mma=True, clusters=4), dict(cluster_size=8, clusters=3),
              dict(cluster_size=1, cluster_mma=True, clusters=16), dict(cluster_size=2, cluster_mma=True, clusters=11),
              dict(cluster_size=4, clusters=8),
              # K/V rows staged in shared memory first (up to `stage` keys a block; longer ranges
              # read the cache; shapes without the tensor-core phase ignore it)
              dict(cluster_size=16, cluster_mma=True, stage=256), dict(cluster_size=16, cluster_mma=True, stage=64),
              dict(cluster_size=3, cluster_mma=True, stage=40), dict(cluster_size=8, cluster_mma=True, clusters=2, stage=200),
              # clusters of 15: with the push merge's slice a multiple of 4, some ranks merge no
              # outputs (448 / 15 -> slices of 32: rank 14 none) and receive only (max, l) pairs
              dict(cluster_size=15, cluster_mma=True), dict(cluster_size=15, cluster_mma=True, clusters=2)]
             if cluster else
             [dict(split_keys=32), dict(split_keys=128), dict(max_splits=1), dict(max_splits=5, split_keys=32)])
    for n_kv in (1, 7, 33, 100, 1000, 3000):
        rng = rng_for("dec_attn", n_head, n_head_kv, hd, n_kv)
        q = (rng.standard_normal((n_head, hd)) * 2).astype(np.float32)
        k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
        v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
        pos = np.array([n_kv - 1])
        ref = _ref_attention(q[None], k, v, pos)[0]
        cpu = _cpu_attention(q[None], k, v, pos)[0]
        for plan in plans:
            out, again = cu.dec_attn(q, k, v, cluster, **plan)
            what = f"{variant} {plan} n_kv={n_kv}"
            e = rel_err(out, ref)
            assert e < 2e-5, f"{what}: rel err {e:.2e}"
            e = rel_err(out, cpu)
            assert e < 3e-5, f"{what}: rel err {e:.2e} against the CPU twin"
            np.testing.assert_array_equal(again, out, err_msg=what)


def test_dec_attn_variants_agree():
    """Cluster and global merge on the same long cache: both within float32 of each other."""
    if not _has_cc90():
        pytest.skip("the cluster attention needs compute capability 9.0")
    rng = rng_for("dec_attn_agree")
    q = (rng.standard_normal((14, 64)) * 3).astype(np.float32)
    k = rng.standard_normal((2000, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2000, 2, 64)).astype(np.float32)
    a, _ = cu.dec_attn(q, k, v, True)
    b, _ = cu.dec_attn(q, k, v, False)
    assert rel_err(a, b) < 2e-5


@pytest.mark.parametrize("tname", ALL_TYPES)
def test_dec_proj_resid(tname):
    """RESID mode: y = y_init + W · act (no norm), blocks of 1..64 rows, n_out not a
    multiple of the block; each row's old value is read before it is written."""
    tid, bs = TYPES[tname][0], TYPES[tname][1]
    for n_in in ([256, 768] if bs == 256 else [32, 96, 896]):
        for n_out, rb in ((1, 8), (67, 8), (200, 64), (130, 5)):
            rb = _fit_rows(rb, tname, n_in, 1)
            rng = rng_for("dec_resid", tname, n_in, n_out, rb)
            w = random_weights(rng, tname, n_out, n_in)
            x = (rng.standard_normal(n_in) * rng.uniform(0.1, 3.0, n_in)).astype(np.float32)
            y0 = rng.standard_normal(n_out).astype(np.float32)
            got = cu.dec_proj(0, tid, w, n_in, n_out, x, y=y0, rows_per_block=rb)
            W = _dequant_rows(tname, w, n_out, n_in)
            xd = x.astype(np.float64)
            e = rel_err(got, y0 + W @ xd, np.abs(y0) + np.abs(W) @ np.abs(xd))
            assert e < 2e-5, f"{tname} {n_in}x{n_out} rb={rb}: rel err {e:.2e}"


@pytest.mark.parametrize("tg,tu", [(t, t) for t in ALL_TYPES] + [("Q4_K", "Q6_K"), ("Q8_0", "F16")])
def test_dec_proj_glu(tg, tu):
    """GLU mode: y = silu(Wg · h) * (Wu · h), h = rmsnorm(act) * norm_w (mixed gate/up
    types run the generic instance). The error bound propagates the row dots' error
    through silu(g)*u: scale = |silu'(g)| |u| |Wg||h| + |silu(g)| |Wu||h|."""
    n_in = _n_embd_for(tg, tu)
    for n_out, rb in ((5, 8), (200, 16), (130, 64)):
        rb = min(_fit_rows(rb, tg, n_in, 2), _fit_rows(rb, tu, n_in, 2))
        rng = rng_for("dec_glu", tg, tu, n_out)
        wg, wu = random_weights(rng, tg, n_out, n_in), random_weights(rng, tu, n_out, n_in)
        Wg, Wu = _dequant_rows(tg, wg, n_out, n_in), _dequant_rows(tu, wu, n_out, n_in)
        x = (rng.standard_normal(n_in) * rng.uniform(0.1, 3.0, n_in)).astype(np.float32)
        # norm weights scaled so the gate's values are a few units: silu's curved part
        g1 = Wg @ rms_norm(x.astype(np.float64), 1.0, 1e-6)
        nw = (rng.uniform(0.5, 1.5, n_in) * 3.0 / max(np.std(g1), 1e-30)).astype(np.float32)
        got = cu.dec_proj(1, TYPES[tg][0], wg, n_in, n_out, x, type1=TYPES[tu][0], w1=wu, norm_w=nw, eps=1e-6,
                          rows_per_block=rb)
        assert got.shape == (n_out,)
        h = rms_norm(x.astype(np.float64), nw.astype(np.float64), 1e-6)
        g, u = Wg @ h, Wu @ h
        sig = 1.0 / (1.0 + np.exp(-g))
        dsilu = sig * (1.0 + g * (1.0 - sig))
        scale = np.abs(dsilu) * np.abs(u) * (np.abs(Wg) @ np.abs(h)) + np.abs(g * sig) * (np.abs(Wu) @ np.abs(h))
        e = rel_err(got, swiglu(g, u), scale)
        assert e < 2e-5, f"{tg}/{tu} n_out={n_out} rb={rb}: rel err {e:.2e}"


def test_dec_proj_rejects_bad_modes():
    w = random_weights(rng_for("dec_bad"), "Q8_0", 8, 32)
    x = np.zeros(32, np.float32)
    with pytest.raises(ValueError, match="RESID takes one weight"):
        cu.dec_proj(0, 8, w, 32, 8, x)  # RESID without y
    with pytest.raises(ValueError, match="rows_per_block"):
        cu.dec_proj(0, 8, w, 32, 8, x, y=np.zeros(8, np.float32), rows_per_block=65)


def test_timing_entries():
    """dec_attn_time and sample_rows_time (scripts/gpu_attn_sweep.py): each variant runs and
    gives a positive time; a bad variant is a clear error, not a launch failure."""
    for kw in (dict(cluster=0), dict(cluster=8, cluster_mma=True, clusters=2)):
        if kw["cluster"] and not _has_cc90():
            continue
        us = cu.dec_attn_time(14, 2, 64, 300, layers=2, iters=2, **kw)
        assert 0 < us < 1e5, (kw, us)
    with pytest.raises(ValueError, match="cluster"):
        cu.dec_attn_time(14, 2, 64, 300, cluster=17)
    logits = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32)
    hist = [np.array([1, 2, 3], np.int32)] * 2
    us = cu.sample_rows_time(logits, [(0.7, 40, 0.95, 0.05, 1.0, 0.0, 0.0, 64)] * 2, hist, True, 3)
    assert 0 < us < 1e5
