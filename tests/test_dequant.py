"""CPU dequantization (cpp/quants.cpp) is bitwise equal to gguf.quants.dequantize.

Every comparison is on the float32 bit patterns (viewed as uint32), so -0.0,
NaN payloads and the last bit of every value count.

- random blocks of every supported type (random bytes, fp16 scale fields set to
  random finite values incl. subnormals and negatives), through
  orcd._orcd.dequantize_raw;
- random floats quantized with gguf.quants.quantize where it supports the type;
- every fp16 / bf16 bit pattern (incl. inf and NaN);
- a GGUF file written with gguf.GGUFWriter holding a tensor of every type,
  through orcd.GGUFFile.dequantize / dequantize_rows;
- all 291 tensors of the real model (real_model_path fixture).

MXFP4 (gpt-oss experts): its E8M0 exponent byte is random too, so every exponent
from the subnormal halves (0, 1) to 255 (2^127 x 12 = inf) is covered.
"""
from __future__ import annotations

import numpy as np
import pytest

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

orcd = pytest.importorskip("orcd")
from orcd import _orcd  # noqa: E402

SUPPORTED = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.MXFP4]

# Byte offsets of the fp16 scale fields inside one block (ggml-common.h).
F16_FIELDS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q2_K: [80, 82],   # scales[16] qs[64] d dmin
    QT.Q3_K: [108],      # hmask[32] qs[64] scales[12] d
    QT.Q4_K: [0, 2],     # d dmin scales[12] qs[128]
    QT.Q5_K: [0, 2],     # d dmin scales[12] qh[32] qs[128]
    QT.Q6_K: [208],      # ql[128] qh[64] scales[16] d
}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint32)


def assert_bitwise_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, f"{what}: {g.shape} elements vs {w.shape}"
    diff = np.flatnonzero(g != w)
    if diff.size:
        i = int(diff[0])
        pytest.fail(f"{what}: {diff.size} of {g.size} values differ; first at {i}: "
                    f"orcd {g[i]:#010x} ({g.view(np.float32)[i]!r}) vs gguf {w[i]:#010x} "
                    f"({w.view(np.float32)[i]!r})")


def random_finite_f16(rng, n: int) -> np.ndarray:
    """Random finite fp16 bit patterns: both signs, subnormals, zero, up to 65504."""
    h = rng.integers(0, 0x7C00, size=n, dtype=np.uint16)
    h[: max(1, n // 50)] = rng.integers(0, 0x0400, size=max(1, n // 50), dtype=np.uint16)  # subnormals
    h[-1] = 0x7BFF  # the largest finite half
    return h | (rng.integers(0, 2, size=n, dtype=np.uint16) << 15)


def random_blocks(qtype: QT, n_blocks: int, seed: int) -> np.ndarray:
    """n_blocks random blocks of qtype as a (n_blocks, block_bytes) uint8 array."""
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, []):
        raw[:, off:off + 2] = random_finite_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw


def orcd_raw(qtype: QT, raw: np.ndarray, n: int) -> np.ndarray:
    out = _orcd.dequantize_raw(int(qtype), np.ascontiguousarray(raw).reshape(-1), n)
    assert out.dtype == np.float32 and out.shape == (n,)
    return out


# ------------------------------------------------------------------ random blocks

@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_random_blocks_bitwise(qtype):
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    n_blocks = 3000 if block_size > 1 else 50_000
    if qtype in (QT.F16, QT.BF16, QT.F32):
        # plain types: random bytes, but keep F16/F32 finite here (NaN/inf are tested below)
        rng = np.random.default_rng(int(qtype))
        if qtype == QT.F16:
            raw = random_finite_f16(rng, n_blocks).view(np.uint8)
        elif qtype == QT.F32:
            raw = rng.standard_normal(n_blocks).astype(np.float32)
            raw[:10] = [0.0, -0.0, 1e-40, -1e-45, 3.4e38, np.inf, -np.inf, 1.0, -1.0, 0.5]
            raw = raw.view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=2 * n_blocks, dtype=np.uint8)
        want = gguf_dequantize(raw.copy(), qtype)
    else:
        raw = random_blocks(qtype, n_blocks, seed=int(qtype))
        with np.errstate(over="ignore"):  # MXFP4's exponent 255 times 12 overflows to inf, as in orcd
            want = gguf_dequantize(raw.copy(), qtype)
    n = n_blocks * block_size
    got = orcd_raw(qtype, raw, n)
    assert_bitwise_equal(got, want, f"{qtype.name} random blocks")


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q5_1, QT.Q2_K, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_blocks", [1, 2, 7])
def test_few_blocks(qtype, n_blocks):
    raw = random_blocks(qtype, n_blocks, seed=100 + n_blocks)
    n = n_blocks * GGML_QUANT_SIZES[qtype][0]
    assert_bitwise_equal(orcd_raw(qtype, raw, n), gguf_dequantize(raw.copy(), qtype), qtype.name)


# gguf.quants.quantize implements these (the K-quants it can only dequantize)
QUANTIZABLE = [QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_bitwise(qtype):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 256)) * rng.uniform(1e-3, 10.0, size=(64, 1))).astype(np.float32)
    q = gguf.quants.quantize(x, qtype)
    want = gguf_dequantize(q, qtype).reshape(-1)
    got = orcd_raw(qtype, q.view(np.uint8), x.size)
    assert_bitwise_equal(got, want, f"{qtype.name} quantized floats")
    # and the round trip is close to the input (sanity of the whole pipeline); MXFP4's
    # power-of-two scale leaves the top of a block clipped by up to 1/4 of its largest value
    tol = 0.3 if qtype == QT.MXFP4 else 0.1
    assert np.allclose(got.reshape(x.shape), x, atol=np.abs(x).max() * tol)


# ------------------------------------------------------------------ every fp16 / bf16 pattern

def test_mxfp4_every_code_and_exponent():
    """All 16 E2M1 codes in both nibbles under each of the 256 exponents: the values
    are 2^(e-128) x (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12) (OCP MX spec, ggml's doubled
    table), low nibbles elements 0-15, high nibbles 16-31."""
    raw = np.zeros((256, 17), np.uint8)
    raw[:, 0] = np.arange(256)
    raw[:, 1:] = (np.arange(16) | (np.arange(15, -1, -1) << 4)).astype(np.uint8)
    with np.errstate(over="ignore"):
        want = gguf_dequantize(raw.copy(), QT.MXFP4)
    got = orcd_raw(QT.MXFP4, raw, 256 * 32)
    assert_bitwise_equal(got, want, "MXFP4 codes x exponents")
    table = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float64)
    g = got.reshape(256, 32).astype(np.float64)
    assert np.array_equal(g[128, :16], table) and np.array_equal(g[128, 16:], table[::-1])  # 2^0
    assert np.array_equal(g[130, :16], 4 * table)


def test_every_f16_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = bits(orcd_raw(QT.F16, h.view(np.uint8), h.size))
    want = bits(gguf_dequantize(h.view(np.uint8).copy(), QT.F16))
    is_nan = ((h & 0x7C00) == 0x7C00) & ((h & 0x03FF) != 0)
    assert np.array_equal(got[~is_nan], want[~is_nan])
    # NaN: sign and payload kept, signalling NaNs not quieted (what NumPy's cast does)
    h32 = h.astype(np.uint32)
    rule = ((h32 & 0x8000) << 16) | 0x7F800000 | ((h32 & 0x03FF) << 13)
    assert np.array_equal(got[is_nan], rule[is_nan])
    assert np.array_equal(got[is_nan], want[is_nan]), "NumPy converts fp16 NaNs differently here"


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_1, QT.Q3_K, QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_every_f16_pattern_as_block_scale(qtype):
    """Each fp16 scale field of a block holds every bit pattern once (inf, NaN,
    subnormals included): the block readers agree with NumPy's float16."""
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    raw = random_blocks(qtype, h.size, seed=int(qtype) + 500)
    for k, off in enumerate(F16_FIELDS[qtype]):
        field = np.roll(h, 4099 * k)  # different patterns in d and dmin of one block
        raw[:, off:off + 2] = field.view(np.uint8).reshape(-1, 2)
    n = h.size * GGML_QUANT_SIZES[qtype][0]
    assert_bitwise_equal(orcd_raw(qtype, raw, n), gguf_dequantize(raw.copy(), qtype), f"{qtype.name} scales")


def test_every_bf16_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = bits(orcd_raw(QT.BF16, h.view(np.uint8), h.size))
    want = bits(gguf_dequantize(h.view(np.uint8).copy(), QT.BF16))
    assert np.array_equal(got, want)
    assert np.array_equal(got, h.astype(np.uint32) << 16)


def test_f32_with_nan_payloads_is_a_copy():
    u = np.array([0x7FC00001, 0xFF800001, 0x7F800000, 0x00000001, 0x80000000], dtype=np.uint32)
    got = bits(orcd_raw(QT.F32, u.view(np.uint8), u.size))
    assert np.array_equal(got, u)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("type_id", [int(QT.Q8_1), int(QT.Q8_K), int(QT.IQ2_XXS), int(QT.IQ4_XS),
                                     int(QT.I32), int(QT.F64)])
def test_unsupported_type_raises(type_id):
    name = _orcd.type_traits(type_id)[0]
    assert _orcd.type_traits(type_id)[3] is False
    raw = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError, match=name):
        _orcd.dequantize_raw(type_id, raw, 256)


def test_bad_lengths_raise():
    raw = np.zeros(4096, dtype=np.uint8)
    with pytest.raises(ValueError):
        _orcd.dequantize_raw(int(QT.Q4_0), raw, 33)      # not a whole block
    with pytest.raises(ValueError):
        _orcd.dequantize_raw(int(QT.Q4_K), raw, 128)
    with pytest.raises(ValueError):
        _orcd.dequantize_raw(int(QT.Q8_0), raw, 32 * 200)  # needs 6800 bytes, has 4096
    with pytest.raises(ValueError):
        _orcd.dequantize_raw(12345, raw, 32)              # unknown type id
    assert _orcd.dequantize_raw(int(QT.Q4_K), raw, 0).shape == (0,)


def test_type_traits_match_gguf():
    for qtype in SUPPORTED:
        name, block_size, block_bytes, ok = _orcd.type_traits(int(qtype))
        assert (name, block_size, block_bytes, ok) == (qtype.name, *GGML_QUANT_SIZES[qtype], True)


# ------------------------------------------------------------------ through a GGUF file

def write_all_types_gguf(path) -> dict:
    """A GGUF file with one 3-D tensor [ne0, 3, 2] of every supported type;
    returns name -> (qtype, expected float32 array of shape ne reversed)."""
    w = gguf.GGUFWriter(str(path), "llama")
    expected = {}
    for i, qtype in enumerate(SUPPORTED):
        block_size, block_bytes = GGML_QUANT_SIZES[qtype]
        ne0 = 2 * max(block_size, 32)
        n_rows = 6
        nb = ne0 // block_size * n_rows
        if qtype == QT.F32:
            raw = np.random.default_rng(i).standard_normal(nb).astype(np.float32).view(np.uint8)
        elif qtype == QT.F16:
            raw = random_finite_f16(np.random.default_rng(i), nb).view(np.uint8)
        else:
            raw = random_blocks(qtype, nb, seed=1000 + i).reshape(-1)
        name = f"t.{qtype.name.lower()}"
        data = raw.reshape(2, 3, -1)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        with np.errstate(over="ignore"):
            want = gguf_dequantize(raw.copy(), qtype).reshape(2, 3, ne0)
        expected[name] = (qtype, want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_gguf_file_every_type(tmp_path):
    path = tmp_path / "all_types.gguf"
    expected = write_all_types_gguf(path)
    f = orcd.GGUFFile(str(path))
    try:
        for name, (qtype, want) in expected.items():
            got = f.dequantize(name)
            assert got.dtype == np.float32
            assert got.shape == want.shape, name
            assert_bitwise_equal(got, want, name)
            rows = want.reshape(-1, want.shape[-1])
            for r0, r1 in [(0, 6), (1, 4), (5, 6), (3, 3)]:
                part = f.dequantize_rows(name, r0, r1)
                assert part.shape == (r1 - r0, want.shape[-1])
                assert_bitwise_equal(part, rows[r0:r1], f"{name} rows [{r0}, {r1})")
            with pytest.raises(ValueError, match=name.replace(".", r"\.")):
                f.dequantize_rows(name, 4, 7)
    finally:
        f.close()


# ------------------------------------------------------------------ the real model

def test_real_model_every_tensor(real_model_path):
    reader = gguf.GGUFReader(real_model_path)
    f = orcd.GGUFFile(real_model_path)
    try:
        names = [t.name for t in f.tensors]
        assert len(reader.tensors) == len(names) == 291
        by_name = {t.name: t for t in f.tensors}
        bad = []
        for t in reader.tensors:
            ne = tuple(int(v) for v in t.shape)
            assert tuple(by_name[t.name].shape) == ne, t.name
            want = gguf_dequantize(t.data, t.tensor_type).reshape(tuple(reversed(ne)))
            got = f.dequantize(t.name)
            if got.shape != want.shape or not np.array_equal(bits(got), bits(want)):
                bad.append(f"{t.name} ({t.tensor_type.name}, {ne})")
            del got, want
        assert not bad, f"{len(bad)} tensors differ from gguf: {bad[:10]}"
    finally:
        f.close()


def test_real_model_rows(real_model_path):
    """dequantize_rows over a few row ranges equals the slices of gguf's result."""
    reader = gguf.GGUFReader(real_model_path)
    f = orcd.GGUFFile(real_model_path)
    try:
        seen = set()
        for t in reader.tensors:
            if t.tensor_type in seen or len(t.shape) < 2:
                continue
            seen.add(t.tensor_type)
            ne0, n_rows = int(t.shape[0]), int(np.prod(t.shape[1:]))
            want = gguf_dequantize(t.data, t.tensor_type).reshape(n_rows, ne0)
            for r0, r1 in [(0, 1), (n_rows - 3, n_rows), (n_rows // 3, n_rows // 3 + 17)]:
                got = f.dequantize_rows(t.name, r0, r1)
                assert_bitwise_equal(got, want[r0:r1], f"{t.name} rows [{r0}, {r1})")
        assert len(seen) >= 4
    finally:
        f.close()


def test_dequantize_raw_into_out_buffer():
    rng = np.random.default_rng(5)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    buf = np.full(300, np.nan, np.float32)
    res = orcd._orcd.dequantize_raw(8, q.reshape(-1), 256, out=buf)
    assert res is buf
    assert np.array_equal(buf[:256], ref) and np.isnan(buf[256:]).all()
    with pytest.raises(ValueError, match="out holds 100 floats"):
        orcd._orcd.dequantize_raw(8, q.reshape(-1), 256, out=np.empty(100, np.float32))
