"""Long contexts (issue 17): the tensor-core prompt attention, decode attention over
long caches, engines with the model's whole window (n_ctx 32768), RoPE scaling keys.

Bounds (stated here, enforced below):
- flash attention (Q and P rounded to fp16, fp32 accumulation) against a float64
  reference over the fp16-rounded Q, K, V: ||got - ref|| / ||ref|| < 1e-3 (P's
  rounding, 2^-11 per weight, is what remains: ~2e-4 in a NumPy model of it at 16384
  keys); against the float64 reference over the unrounded Q and the CPU twin: < 2e-3
  (~5e-4 modelled). A fragment-layout mistake gives errors of order 1.
- the fused decoder's attention at 4096 / 16384 positions (tensor-core tiles with Q and
  P as fp16 hi + lo pairs, float32 softmax and merge) and the generic attention's decode
  plan (CUDA cores, float32): < 2e-5 against float64, < 3e-5 against the CPU twin, the
  same bits on a second launch.
- a tiny model with head_dim 64 through the CUDA engine (prompt chunks on the
  tensor-core kernel) against the CPU engine: per-row logit cosine >= 0.999.
- engines with n_ctx 32768 give the same logits as with n_ctx 64 for a short prompt
  (CPU: bitwise; GPU: cosine >= 0.99999).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from orcd import _orcd as core

try:
    from orcd import _orcd_cuda as cu
    _CUDA_WHY = cu.cuda_status()
except ImportError as e:  # built without CUDA
    cu = None
    _CUDA_WHY = f"orcd._orcd_cuda is not available: {e}"

needs_cuda = pytest.mark.skipif(bool(_CUDA_WHY), reason=_CUDA_WHY or "")


def rel_err(a, ref) -> float:
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    assert np.all(np.isfinite(a)), f"{np.count_nonzero(~np.isfinite(a))} non-finite outputs"
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def ref_attention(q, k, v, pos):
    """float64 causal GQA attention, one query at a time (no n_q x n_kv matrix):
    q [n_q, H, D], k/v [n_kv, Hkv, D]; query t sees keys 0..pos[t]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    n_q, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = np.empty((n_q, H, D))
    for t in range(n_q):
        n = int(pos[t]) + 1
        for j in range(Hkv):
            s = q[t, j * G:(j + 1) * G] @ k[:n, j].T / np.sqrt(D)  # [G, n]
            s = np.exp(s - s.max(axis=1, keepdims=True))
            out[t, j * G:(j + 1) * G] = (s @ v[:n, j]) / s.sum(axis=1, keepdims=True)
    return out


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def cpu_attention(q, k, v, pos):
    """The CPU engine's attention (cpp/cpu_ops.cpp) on the fp16-rounded K/V, one slot."""
    n_kv, n_head_kv, hd = k.shape
    kt = np.full((1, n_head_kv, hd, n_kv), np.nan, np.float32)
    vc = np.full((1, n_kv, n_head_kv * hd), np.nan, np.float32)
    core.cpu_ops_kv_append(kt, vc, f16(k).astype(np.float32), f16(v).astype(np.float32),
                           np.zeros(n_kv, np.int32), np.arange(n_kv, dtype=np.int32))
    return core.cpu_ops_attention(np.ascontiguousarray(q, np.float32), kt, vc, np.zeros(len(pos), np.int32),
                                  np.asarray(pos, np.int32))


def _inputs(seed, n_q, n_kv, n_head, n_head_kv, hd, pos):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((n_q, n_head, hd)) * 2).astype(np.float32)  # sharper softmax
    k = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    v = rng.standard_normal((n_kv, n_head_kv, hd)).astype(np.float32)
    return q, k, v, np.asarray(pos, np.int32)


# (n_kv, positions of the queries): one position; a prompt from 0; chunks that start
# at pos0 > 0 (the second chunk of a prompt, a chunk deep in a long one)
def _positions(case):
    if case == "1":
        return 1, [0]
    if case == "100":
        return 100, list(range(100))
    if case == "4096":
        return 4096, list(range(4096 - 80, 4096))          # a chunk at pos0 = 4016
    if case == "chunk2":
        return 700, list(range(512, 700))                   # the second 512-token chunk
    if case == "16384":
        return 16384, list(range(16384 - 40, 16384)) + [0, 5000, 9999]  # and scattered rows
    raise AssertionError(case)


@needs_cuda
@pytest.mark.parametrize("case", ["1", "100", "chunk2", "4096", "16384"])
@pytest.mark.parametrize("n_head,n_head_kv", [(4, 4), (4, 2), (14, 2)])  # GQA ratios 1, 2, 7
@pytest.mark.parametrize("hd", [64, 128])
def test_flash_attention_vs_reference(case, n_head, n_head_kv, hd):
    """The tensor-core kernel (one split, and the engine's routing for a one-slot
    launch) against float64 over fp16-rounded inputs, float64 over the float32 Q and
    the CPU twin. The keys sit in slot 1 of a 3-slot cache whose other slots are NaN:
    a read outside slot 1's positions 0..max(pos) would make the output NaN."""
    n_kv, pos = _positions(case)
    q, k, v, pos = _inputs(zlib.crc32(f"{case} {n_head} {n_head_kv} {hd}".encode()), len(pos), n_kv, n_head, n_head_kv, hd, pos)
    ref16 = ref_attention(f16(q), f16(k), f16(v), pos)
    ref = ref_attention(q, f16(k), f16(v), pos)
    for routed in (False, True):
        got = cu.flash_attention(q, k, v, pos, routed=routed)
        what = f"{case} H={n_head}/{n_head_kv} hd={hd} routed={routed}"
        e = rel_err(got, ref16)
        assert e < 1e-3, f"{what}: rel err {e:.2e} against float64 over fp16 inputs"
        e = rel_err(got, ref)
        assert e < 2e-3, f"{what}: rel err {e:.2e} against float64"
    if n_kv <= 4096:  # the CPU twin at 16384 positions is slow on a small machine
        e = rel_err(got, cpu_attention(q, k, v, pos))
        assert e < 2e-3, f"{case}: rel err {e:.2e} against the CPU twin"


@needs_cuda
@pytest.mark.parametrize("hd", [64, 128])
def test_flash_attention_splits(hd):
    """Key splits of 64, 128 and 512 keys merged by the combine kernel (some splits of
    a row empty: their (max, sum) must be skipped) == one split, within fp16 rounding."""
    n_kv = 1500
    pos = list(range(n_kv - 70, n_kv)) + [3, 64, 700]
    q, k, v, pos = _inputs(7 + hd, len(pos), n_kv, 14, 2, hd, pos)
    ref16 = ref_attention(f16(q), f16(k), f16(v), pos)
    for split in (0, 64, 128, 512):
        got = cu.flash_attention(q, k, v, pos, split_len=split)
        e = rel_err(got, ref16)
        assert e < 1e-3, f"split_len={split}: rel err {e:.2e}"


@needs_cuda
def test_flash_attention_rejects_bad_split():
    q, k, v, pos = _inputs(1, 4, 100, 4, 2, 64, [99] * 4)
    with pytest.raises(ValueError, match="split_len"):
        cu.flash_attention(q, k, v, pos, split_len=100)
    q2, k2, v2, _ = _inputs(1, 4, 100, 4, 2, 32, [99] * 4)
    with pytest.raises(ValueError, match="head_dim"):
        cu.flash_attention(q2, k2, v2, pos)


@needs_cuda
@pytest.mark.parametrize("n_kv", [4096, 16384])
@pytest.mark.parametrize("n_head,n_head_kv,hd", [(14, 2, 64), (12, 2, 128)])
def test_decode_attention_long_cache(n_kv, n_head, n_head_kv, hd):
    """One query at the last of n_kv positions: the fused decoder's attention (global
    merge, the path of long caches: tensor-core tiles with fp16 hi+lo operands) and the
    generic attention's decode plan, against float64 and the CPU twin."""
    q, k, v, pos = _inputs(n_kv + hd, 1, n_kv, n_head, n_head_kv, hd, [n_kv - 1])
    ref = ref_attention(q, f16(k), f16(v), pos)[0]
    cpu = cpu_attention(q, k, v, pos)[0]
    # 64 splits: the engine's grid (two chunks of the staged merge); 32; few long splits
    # and the cluster variant's blocks on the tensor-core phase (8 or 16 a cluster, Hopper)
    plans = [dict(max_splits=64), dict(max_splits=32), dict(max_splits=5, split_keys=1024)]
    if int(cu.device_info()["compute_capability"].split(".")[0]) >= 9:
        plans += [dict(cluster=True, cluster_mma=True), dict(cluster=True, cluster_size=16, cluster_mma=True),
                  dict(cluster=True, cluster_size=16, cluster_mma=True, clusters=4),
                  dict(cluster=True, cluster_size=16, cluster_mma=True, clusters=2),
                  # many small clusters, their partials merged outside (by attn_output in the engine)
                  dict(cluster=True, cluster_size=1, cluster_mma=True, clusters=16),
                  dict(cluster=True, cluster_size=2, cluster_mma=True, clusters=16),
                  dict(cluster=True, cluster_size=4, cluster_mma=True, clusters=8),
                  # K/V rows staged in shared memory before the wait (the rows past a block's
                  # `stage` keys read from the cache instead)
                  dict(cluster=True, cluster_size=16, cluster_mma=True, stage=256),
                  dict(cluster=True, cluster_size=16, cluster_mma=True, clusters=4, stage=256)]
        if hd == 64:
            plans += [dict(cluster=True, cluster_size=16, cluster_mma=True, clusters=2, stage=512)]
    for plan in plans:
        what, plan = str(plan), dict(plan)
        out, again = cu.dec_attn(q[0], k, v, plan.pop("cluster", False), **plan)
        assert rel_err(out, ref) < 2e-5, what
        assert rel_err(out, cpu) < 3e-5, what
        np.testing.assert_array_equal(again, out, err_msg=what)
    gen = cu.attention(q, k, v, pos)[0]
    assert rel_err(gen, ref) < 2e-5
    assert rel_err(gen, cpu) < 3e-5


# ------------------------------------------------------------------ engines

def test_cpu_engine_whole_window(tiny_model):
    """A CPU engine with n_ctx 32768 (the Qwen2.5 window) runs, and a short prompt
    gives the same logits as with n_ctx 64; a token at position 32767 is accepted."""
    path = tiny_model("F32", n_ctx_train=32768)
    toks = np.arange(1, 9, dtype=np.int32)
    small = core.CpuEngine(path, 64, 1, 1)
    big = core.CpuEngine(path, 32768, 1, 1)
    a = small.forward(0, toks, 0, all_logits=True)
    b = big.forward(0, toks, 0, all_logits=True)
    np.testing.assert_array_equal(a, b)
    last = big.forward(0, toks[:1], 32767)
    assert np.all(np.isfinite(last))
    with pytest.raises(ValueError):
        big.forward(0, toks[:2], 32767)  # past the window


@needs_cuda
def test_cuda_engine_whole_window(tiny_model):
    path = tiny_model("F32", n_ctx_train=32768)
    toks = np.arange(1, 40, dtype=np.int32)
    small = cu.CudaEngine(path, 64, 1)
    big = cu.CudaEngine(path, 32768, 1)
    a = small.forward(0, toks, 0, all_logits=True)
    b = big.forward(0, toks, 0, all_logits=True)
    num = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert num.min() >= 0.99999
    last = big.forward(0, toks[:1], 32767)
    assert np.all(np.isfinite(last))
    small.close()
    big.close()


@needs_cuda
def test_cuda_engine_long_prompt_flash(tiny_model):
    """head_dim 64 (n_embd 256, 4 heads, 2 KV heads): a 1300-token prompt runs in
    chunks of up to 512 through the tensor-core attention (the second and third chunks
    start at pos0 > 0); every row's logits against the CPU engine, and the decode
    steps after it (the fused decoder over the cache the prompt wrote)."""
    path = tiny_model("F16", n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=4096)
    toks = np.random.default_rng(3).integers(0, 200, 1300).astype(np.int32)
    cpu = core.CpuEngine(path, 1400, 1)
    gpu = cu.CudaEngine(path, 1400, 1)
    lc = cpu.forward(0, toks, 0, all_logits=True)
    lg = gpu.forward(0, toks, 0, all_logits=True)
    num = (lc * lg).sum(axis=1) / (np.linalg.norm(lc, axis=1) * np.linalg.norm(lg, axis=1))
    assert num.min() >= 0.999, f"cosine {num.min():.6f} at row {int(np.argmin(num))}"
    t = np.array([int(np.argmax(lc[-1]))], np.int32)
    for step in range(3):
        a = cpu.forward(0, t, len(toks) + step)
        b = gpu.forward(0, t, len(toks) + step)
        c = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert c >= 0.999, f"decode step {step}: cosine {c:.6f}"
        t = np.array([int(np.argmax(a))], np.int32)
    gpu.close()


# ------------------------------------------------------------------ RoPE scaling keys

def test_rope_scaling_refused(tmp_path, tiny_model):
    """A RoPE scaling type orcd does not implement is refused at load with a ValueError
    naming the key and the value; 'none' loads."""
    gguf = pytest.importorskip("gguf")
    from tiny_models import copy_with_metadata

    src = tiny_model("F32")
    S = gguf.GGUFValueType.STRING
    for kind in ("yarn", "linear"):
        bad = copy_with_metadata(src, tmp_path / f"{kind}.gguf", {
            "qwen2.rope.scaling.type": (kind, S),
            "qwen2.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32),
            "qwen2.rope.scaling.original_context_length": (32768, gguf.GGUFValueType.UINT32)})
        with pytest.raises(ValueError, match=rf"rope\.scaling\.type.*{kind}"):
            core.CpuEngine(bad, 16, 1)
    ok = copy_with_metadata(src, tmp_path / "none.gguf", {"qwen2.rope.scaling.type": ("none", S)})
    e = core.CpuEngine(ok, 16, 1)
    ref = core.CpuEngine(src, 16, 1)
    toks = np.arange(1, 6, dtype=np.int32)
    np.testing.assert_array_equal(e.forward(0, toks, 0), ref.forward(0, toks, 0))
