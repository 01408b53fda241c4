"""The CUDA engine against the CPU engine (orcd._orcd.CpuEngine).

Per-layer hidden states and logits must agree to cosine >= 0.999 with the same
argmax, on tiny random models of every weight type and on the real model;
greedy decoding of the real model must give the same 32 tokens on 5 prompts.

"Same argmax" has one principled exception. The CPU engine's quantized
kernels round the activations to integer codes (8-bit codes moved its logits by
up to ~0.15 on the tiny models; 16-bit codes far less), and on those random
models a top-2 margin of 0.01 is common: an engine can then disagree with the
exact answer itself. So the arbiter is a float64 NumPy forward pass (tests/reference_qwen2.py):
the GPU's pick must be the reference's pick unless the reference's own margin
between the two is within twice the GPU's measured logit error, and a GPU/CPU
difference is accepted only where the reference margin between their picks is
within twice the two engines' measured errors (a near tie both engines
legitimately resolve differently). Without a reference the check is strict.
Also: the decode batch (two different prompts in one batch == each alone),
prompts longer than one chunk, the gemm path of large batches, errors; the
fused decode step (single-token forward, decode_greedy) against the mat-vec
path, and its CUDA-graph / PDL variants against each other (bitwise).

Skipped as a whole when orcd._orcd_cuda is missing or no usable GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()

from orcd import _orcd as core  # noqa: E402

try:
    from tiny_models import WEIGHT_TYPES
except Exception:  # gguf missing: the tiny-model tests skip through the fixture anyway
    WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

COS_MIN = 0.999


def cosine_rows(a, b):
    a = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, np.float64).reshape(-1, np.shape(b)[-1])
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-30)


def assert_close_rows(gpu, cpu, what, cos_min=COS_MIN):
    assert np.all(np.isfinite(gpu)), f"{what}: non-finite GPU values"
    c = cosine_rows(gpu, cpu)
    worst = int(np.argmin(c))
    assert c.min() >= cos_min, f"{what}: cosine {c.min():.6f} at row {worst} (< {cos_min})"


def assert_same_argmax(gpu, cpu, what, ref=None):
    """Same argmax per row; with `ref` (float64 logits of the same rows), near
    ties within the engines' measured errors are accepted (see the module doc)."""
    gpu = np.atleast_2d(np.asarray(gpu, np.float64))
    cpu = np.atleast_2d(np.asarray(cpu, np.float64))
    ref = None if ref is None else np.atleast_2d(np.asarray(ref, np.float64))
    for r in range(gpu.shape[0]):
        g, c = int(np.argmax(gpu[r])), int(np.argmax(cpu[r]))
        if ref is None:
            assert g == c, f"{what}: row {r}: GPU argmax {g}, CPU argmax {c} (CPU margin {cpu[r, c] - cpu[r, g]:.4g})"
            continue
        t = int(np.argmax(ref[r]))
        eg = float(np.abs(gpu[r] - ref[r]).max())
        ec = float(np.abs(cpu[r] - ref[r]).max())
        if g != t:
            m = float(ref[r, t] - ref[r, g])
            assert m <= 2 * eg, (f"{what}: row {r}: GPU argmax {g}, reference {t}: reference margin {m:.4g} "
                                 f"> 2 x GPU logit error {eg:.4g}")
        if g != c:
            m = abs(float(ref[r, c] - ref[r, g]))
            assert m <= 2 * (eg + ec), (f"{what}: row {r}: GPU argmax {g}, CPU argmax {c}: reference margin "
                                        f"{m:.4g} > 2 x (GPU error {eg:.4g} + CPU error {ec:.4g})")


_REFS = {}


def reference(path):
    """float64 NumPy reference of a (tiny) model, or None without the gguf package."""
    if path not in _REFS:
        try:
            from reference_qwen2 import Qwen2Reference
            _REFS[path] = Qwen2Reference(path, dtype=np.float64)
        except ImportError:
            _REFS[path] = None
    return _REFS[path]


def ref_last_logits(path, tokens):
    r = reference(path)
    return None if r is None else r.forward(list(tokens))[1][-1]


def compare_trace(path, tokens, n_ctx=64, ref=None):
    """GPU trace vs CPU trace (and vs the reference `ref`, a Qwen2Reference, if given)."""
    cpu = core.CpuEngine(path, n_ctx, 1)
    gpu = cu.CudaEngine(path, n_ctx, 1)
    try:
        hc, lc = cpu.trace(tokens)
        hg, lg = gpu.trace(tokens)
        hr, lr = ref.forward(list(tokens)) if ref is not None else (None, None)
        assert len(hg) == len(hc) == cpu.info()["n_layer"] + 1
        for i, (a, b) in enumerate(zip(hg, hc)):
            assert a.shape == b.shape
            assert_close_rows(a, b, f"hidden[{i}] vs CPU")
            if hr is not None:
                assert_close_rows(a, hr[i], f"hidden[{i}] vs reference")
        assert lg.shape == lc.shape
        assert_close_rows(lg, lc, "logits vs CPU")
        if lr is not None:
            assert_close_rows(lg, lr, "logits vs reference")
        assert_same_argmax(lg, lc, "logits", ref=lr)
        return lg, lc, lr
    finally:
        gpu.close()


# ------------------------------------------------------------------ tiny random models

@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_tiny_trace_matches_cpu(tiny_model, wtype):
    path = tiny_model(wtype)
    n_vocab = core.CpuEngine(path, 8, 1).info()["n_vocab"]
    tokens = np.random.default_rng(1).integers(0, n_vocab, 23).astype(np.int32)
    compare_trace(path, tokens, ref=reference(path))


@pytest.mark.parametrize("wtype", ["Q8_0", "Q4_K", "F16"])
def test_tiny_tied_output(tiny_model, wtype):
    path = tiny_model(wtype, tied=True)
    assert cu.CudaEngine(path, 16, 1).info()["tied_output"]
    n_vocab = core.CpuEngine(path, 8, 1).info()["n_vocab"]
    tokens = np.random.default_rng(2).integers(0, n_vocab, 9).astype(np.int32)
    compare_trace(path, tokens, ref=reference(path))


def test_tiny_mixed_types_like_q4_k_m(tiny_model):
    """The tensor types of the real Q4_K_M file in one model."""
    path = tiny_model("Q5_0", tensor_types={"ffn_down.weight": "Q6_K", "ffn_gate.weight": "Q4_K",
                                             "ffn_up.weight": "Q4_K", "attn_v.weight": "Q8_0",
                                             "token_embd.weight": "Q8_0"}, tied=True)
    n_vocab = core.CpuEngine(path, 8, 1).info()["n_vocab"]
    tokens = np.random.default_rng(3).integers(0, n_vocab, 17).astype(np.int32)
    compare_trace(path, tokens, ref=reference(path))


def test_qwen05_shaped_model(tiny_model):
    """Two layers of Qwen2.5-0.5B-Instruct Q4_K_M's exact shapes and types
    (n_embd 896, 14/2 heads of 64, n_ff 4864, Q5_0 attention/FFN/embedding, Q8_0
    attn_v and output, Q6_K and Q4_K ffn_down) with a 40000-row vocabulary, so
    the all-logits lm_head is dequantized in several fp16 chunks."""
    path = tiny_model("Q5_0", n_layer=2, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864, n_vocab=40000,
                      tensor_types={"blk.0.ffn_down.weight": "Q6_K", "blk.1.ffn_down.weight": "Q4_K",
                                    "blk.1.attn_v.weight": "Q8_0", "output.weight": "Q8_0"})
    tokens = np.random.default_rng(9).integers(0, 40000, 21).astype(np.int32)
    compare_trace(path, tokens, n_ctx=64, ref=reference(path))
    # and the decode path (mat-vec) on the same shapes
    cpu = core.CpuEngine(path, 64, 1)
    gpu = cu.CudaEngine(path, 64, 1)
    seq = list(tokens[:10])
    lc, lg = cpu.forward(0, tokens[:10], 0), gpu.forward(0, tokens[:10], 0)
    for step in range(4):
        t = int(np.argmax(lc))
        seq.append(t)
        lc = cpu.forward(0, np.array([t], np.int32), 10 + step)
        lg = gpu.forward(0, np.array([t], np.int32), 10 + step)
        lr = ref_last_logits(path, seq)
        assert_close_rows(lg, lc, f"decode step {step}")
        assert_same_argmax(lg, lc, f"decode step {step}", ref=lr)
    gpu.close()


def _greedy(engine, slot, prompt, steps):
    """Prompt then `steps` greedy single-token decodes; returns (tokens, logits per step)."""
    logits = engine.forward(slot, np.asarray(prompt, np.int32), 0)
    out, ls = [], [logits]
    pos = len(prompt)
    for _ in range(steps):
        t = int(np.argmax(logits))
        out.append(t)
        logits = engine.forward(slot, np.array([t], np.int32), pos)
        ls.append(logits)
        pos += 1
    return out, ls


@pytest.mark.parametrize("wtype", ["Q4_K", "Q5_0", "Q8_0", "F16"])
def test_tiny_incremental_decode_matches_cpu(tiny_model, wtype):
    """Prompt (gemm path) + single-token steps (mat-vec path, attention over the cache)."""
    path = tiny_model(wtype)
    cpu = core.CpuEngine(path, 64, 1)
    gpu = cu.CudaEngine(path, 64, 1)
    prompt = np.random.default_rng(4).integers(0, cpu.info()["n_vocab"], 11)
    # Drive both with the CPU's tokens so a near tie cannot fork the sequences.
    seq = [int(t) for t in prompt]
    lc = cpu.forward(0, prompt.astype(np.int32), 0)
    lg = gpu.forward(0, prompt.astype(np.int32), 0)
    pos = len(prompt)
    for step in range(12):
        lr = ref_last_logits(path, seq)
        assert_close_rows(lg, lc, f"step {step}")
        if lr is not None:
            assert_close_rows(lg, lr, f"step {step} vs reference")
        assert_same_argmax(lg, lc, f"step {step}", ref=lr)
        t = np.array([int(np.argmax(lc))], np.int32)
        seq.append(int(t[0]))
        lc = cpu.forward(0, t, pos)
        lg = gpu.forward(0, t, pos)
        pos += 1
    gpu.close()


def test_tiny_prompt_split_equals_whole(tiny_model):
    """all_logits of one forward == logits of the same tokens fed in pieces."""
    path = tiny_model("Q8_0")
    gpu = cu.CudaEngine(path, 64, 1)
    toks = np.random.default_rng(5).integers(0, gpu.n_vocab, 20).astype(np.int32)
    whole = gpu.forward(0, toks, 0, all_logits=True)
    assert whole.shape == (20, gpu.n_vocab)
    # (the last-token lm_head is a float32 mat-vec, all_logits an fp16 GEMM: not bitwise equal)
    last = gpu.forward(0, toks, 0)
    assert_close_rows(last, whole[-1], "last vs all_logits", cos_min=0.9999)
    a = gpu.forward(0, toks[:13], 0, all_logits=True)
    b = gpu.forward(0, toks[13:19], 13, all_logits=True)
    c = gpu.forward(0, toks[19:], 19)
    pieces = np.concatenate([a, b, c[None]])
    assert_close_rows(pieces, whole, "pieces vs whole", cos_min=0.9999)
    lr = reference(path).forward(list(toks))[1] if reference(path) else None
    assert_same_argmax(pieces, whole, "pieces vs whole", ref=lr)
    gpu.close()


def test_tiny_decode_batch_two_prompts(tiny_model):
    """Two different prompts in slots 0 and 1, then batched decode steps at
    different positions == each sequence run alone (and == the CPU engine)."""
    path = tiny_model("Q4_K")
    rng = np.random.default_rng(6)
    gpu2 = cu.CudaEngine(path, 64, 2)
    V = gpu2.n_vocab
    prompts = [rng.integers(0, V, 7).astype(np.int32), rng.integers(0, V, 12).astype(np.int32)]
    steps = 10

    # each alone, one-slot engines, on the mat-vec path that decode_batch uses (a single
    # token otherwise takes the fused decode kernels: compared in test_fast_decode_*)
    alone = []
    for p in prompts:
        g1 = cu.CudaEngine(path, 64, 1)
        g1.set_options(fast_decode=False)
        alone.append(_greedy(g1, 0, p, steps))
        g1.close()

    # both in one engine: prompts into slots 0/1, then decode_batch
    l0 = gpu2.forward(0, prompts[0], 0)
    l1 = gpu2.forward(1, prompts[1], 0)
    logits = [l0, l1]
    pos = [len(prompts[0]), len(prompts[1])]
    toks = [[], []]
    for step in range(steps):
        t = [int(np.argmax(logits[0])), int(np.argmax(logits[1]))]
        for s in range(2):
            toks[s].append(t[s])
        order = [1, 0] if step % 2 else [0, 1]  # the batch order must not matter
        out = gpu2.decode_batch(np.array(order, np.int32), np.array([t[i] for i in order], np.int32),
                                np.array([pos[i] for i in order], np.int32))
        assert out.shape == (2, V)
        for j, s in enumerate(order):
            logits[s] = out[j]
            assert_close_rows(out[j], alone[s][1][step + 1], f"slot {s} step {step}", cos_min=0.99999)
        pos = [p + 1 for p in pos]
    for s in range(2):
        assert toks[s] == alone[s][0], f"slot {s}: batched tokens differ from the single-sequence run"

    # and the same batch on the CPU engine
    cpu = core.CpuEngine(path, 64, 2)
    cpu.forward(0, prompts[0], 0)
    cpu.forward(1, prompts[1], 0)
    gpu3 = cu.CudaEngine(path, 64, 2)
    gpu3.forward(0, prompts[0], 0)
    gpu3.forward(1, prompts[1], 0)
    lc = cpu.decode_batch(np.array([0, 1], np.int32), np.array([5, 9], np.int32),
                          np.array([len(prompts[0]), len(prompts[1])], np.int32))
    lg = gpu3.decode_batch(np.array([0, 1], np.int32), np.array([5, 9], np.int32),
                           np.array([len(prompts[0]), len(prompts[1])], np.int32))
    assert_close_rows(lg, lc, "decode_batch vs CPU")
    lr = None
    if reference(path) is not None:
        lr = np.stack([ref_last_logits(path, list(prompts[0]) + [5]), ref_last_logits(path, list(prompts[1]) + [9])])
        assert_close_rows(lg, lr, "decode_batch vs reference")
    assert_same_argmax(lg, lc, "decode_batch vs CPU", ref=lr)
    gpu2.close()
    gpu3.close()


def test_tiny_large_batch_gemm_path(tiny_model):
    """A decode batch of more than 8 slots goes through the cuBLAS path."""
    path = tiny_model("Q6_K")
    n = 11
    cpu = core.CpuEngine(path, 32, n)
    gpu = cu.CudaEngine(path, 32, n)
    rng = np.random.default_rng(7)
    V = gpu.n_vocab
    plen = rng.integers(1, 9, n)
    prompts = []
    for s in range(n):
        p = rng.integers(0, V, plen[s]).astype(np.int32)
        prompts.append(p)
        cpu.forward(s, p, 0)
        gpu.forward(s, p, 0)
    slots = rng.permutation(n).astype(np.int32)
    toks = rng.integers(0, V, n).astype(np.int32)
    pos = plen[slots].astype(np.int32)
    lc = cpu.decode_batch(slots, toks, pos)
    lg = gpu.decode_batch(slots, toks, pos)
    assert_close_rows(lg, lc, "batch of 11")
    lr = None
    if reference(path) is not None:
        lr = np.stack([ref_last_logits(path, list(prompts[s]) + [int(t)]) for s, t in zip(slots, toks)])
        assert_close_rows(lg, lr, "batch of 11 vs reference")
    assert_same_argmax(lg, lc, "batch of 11", ref=lr)
    gpu.close()


def test_tiny_long_prompt_chunks_and_splits(tiny_model):
    """A prompt longer than one chunk (512 tokens), then decode steps over a
    long cache (attention split along the keys)."""
    path = tiny_model("Q8_0")
    n_ctx = 1400
    cpu = core.CpuEngine(path, n_ctx, 1)
    gpu = cu.CudaEngine(path, n_ctx, 1)
    assert gpu.info()["prompt_chunk"] == 512
    V = gpu.n_vocab
    toks = np.random.default_rng(8).integers(0, V, 1100).astype(np.int32)
    lc = cpu.forward(0, toks, 0, all_logits=True)
    lg = gpu.forward(0, toks, 0, all_logits=True)
    assert_close_rows(lg, lc, "long prompt")
    pos = len(toks)
    for step in range(3):
        t = np.array([int(np.argmax(lc[-1] if step == 0 else lc))], np.int32)
        lc = cpu.forward(0, t, pos)
        lg = gpu.forward(0, t, pos)
        assert_close_rows(lg, lc, f"decode at {pos}")
        pos += 1
    gpu.close()


# ------------------------------------------------------------------ API and errors

def test_info_and_errors(tiny_model):
    path = tiny_model("Q4_0")
    calls = []
    gpu = cu.CudaEngine(path, 32, 2, progress=lambda done, total: calls.append((done, total)))
    info = gpu.info()
    assert info["backend"] == "cuda" and info["n_ctx"] == 32 and info["n_slots"] == 2
    assert info["vram_bytes"] == info["vram_weights"] + info["vram_kv"] + info["vram_scratch"] + \
        info["vram_resident_f16"] > 0
    cinfo = core.CpuEngine(path, 32, 2).info()
    for k in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "n_vocab", "tied_output"):
        assert info[k] == cinfo[k], k
    assert calls and calls[-1][0] == calls[-1][1]
    V = gpu.n_vocab
    with pytest.raises(ValueError, match="slot"):
        gpu.forward(2, np.array([1], np.int32), 0)
    with pytest.raises(ValueError, match="n_ctx"):
        gpu.forward(0, np.arange(5, dtype=np.int32), 30)
    with pytest.raises(ValueError, match="token id"):
        gpu.forward(0, np.array([V], np.int32), 0)
    with pytest.raises(ValueError, match="twice"):
        gpu.decode_batch(np.array([1, 1], np.int32), np.array([1, 2], np.int32), np.array([0, 0], np.int32))
    with pytest.raises(ValueError):
        gpu.decode_batch(np.array([0], np.int32), np.array([1], np.int32), np.array([32], np.int32))
    gpu.close()
    with pytest.raises(ValueError, match="closed"):
        gpu.info()


def test_not_enough_memory(tiny_model):
    """A pool of every slot's n_ctx that cannot fit is sized down to what fits in 90% of the free
    memory (at least one sequence); a kv_memory beyond the free memory is refused before anything
    is allocated."""
    path = tiny_model("Q4_0")
    free_before = cu.device_info()["free_memory"]
    e = cu.CudaEngine(path, 1 << 20, 1 << 16)
    info = e.info()
    assert (1 << 20) <= info["kv_pool_positions"] < (1 << 36)
    assert info["vram_bytes"] <= 0.9 * free_before
    e.close()
    with pytest.raises(RuntimeError, match=r"not enough GPU memory: need \d+ bytes, \d+ free .*KV pool"):
        cu.CudaEngine(path, 1 << 20, 1 << 16, kv_memory=free_before + (1 << 30))
    # nothing was left allocated
    assert cu.device_info()["free_memory"] >= free_before - (64 << 20)


def test_bad_path():
    with pytest.raises(ValueError):
        cu.CudaEngine("/nonexistent/model.gguf", 16)


# ------------------------------------------------------------------ the real model

def _real_prompts(path):
    """Five chat prompts as token ids, from the file's own vocabulary (one token per word)."""
    md = dict(core.GGUFFile(path).metadata_items())
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    texts = [
        "Write a python function that returns the sum of a list",
        "What is the capital of France ?",
        "Explain what a hash table is in one sentence",
        "def fibonacci ( n ) :",
        "List three colors of the rainbow",
    ]
    def encode(word):  # greedy longest match; single characters are always tokens
        ids, i = [], 0
        while i < len(word):
            j = len(word)
            while j > i + 1 and word[i:j] not in vocab:
                j -= 1
            ids.append(vocab[word[i:j]])
            i = j
        return ids

    out = []
    for text in texts:
        ids = [vocab["<|im_start|>"], vocab["user"], vocab["Ċ"]]
        for j, w in enumerate(text.split()):
            ids += encode(w if j == 0 else "Ġ" + w)
        ids += [vocab["<|im_end|>"], vocab["Ċ"], vocab["<|im_start|>"], vocab["assistant"], vocab["Ċ"]]
        out.append(np.array(ids, np.int32))
    return out


def test_real_model_trace(real_model_path, real_reference):
    prompt = _real_prompts(real_model_path)[0]
    compare_trace(real_model_path, prompt, n_ctx=256, ref=real_reference)
    info = cu.CudaEngine(real_model_path, 256, 1).info()
    assert info["vram_weights"] < 600 << 20  # quantized blocks, not an fp16 copy


def test_real_model_greedy_32_steps(real_model_path, real_reference):
    """32 greedy tokens on 5 prompts: identical on CPU and GPU. Should they fork,
    the reference (float32 NumPy) judges the step where they do: the test fails
    unless it is a near tie within the engines' measured errors (then the
    prefix up to the fork is still checked, and a warning names the step)."""
    import warnings

    cpu = core.CpuEngine(real_model_path, 256, 1)
    gpu = cu.CudaEngine(real_model_path, 256, 1)
    for i, prompt in enumerate(_real_prompts(real_model_path)):
        tc, lcs = _greedy(cpu, 0, prompt, 32)
        tg, lgs = _greedy(gpu, 0, prompt, 32)
        n_same = next((j for j in range(32) if tc[j] != tg[j]), 32)
        for k in range(n_same + 1):
            assert_close_rows(lgs[k], lcs[k], f"prompt {i} step {k}")
        if n_same < 32:
            k = n_same
            lr = real_reference.forward(list(prompt) + tc[:k])[1][-1]
            assert_same_argmax(lgs[k], lcs[k], f"prompt {i} step {k}", ref=lr)  # fails unless a near tie
            warnings.warn(f"prompt {i}: CPU and GPU fork at step {k} on a near tie "
                          f"(CPU {tc[k]}, GPU {tg[k]}, reference margin {abs(lr[tc[k]] - lr[tg[k]]):.4g})")
    gpu.close()


def test_real_model_decode_batch(real_model_path):
    prompts = _real_prompts(real_model_path)[:2]
    gpu = cu.CudaEngine(real_model_path, 256, 2)
    single = cu.CudaEngine(real_model_path, 256, 1)
    single.set_options(fast_decode=False)  # the mat-vec path, as decode_batch
    ref = [_greedy(single, 0, p, 8)[0] for p in prompts]
    single.close()
    logits = [gpu.forward(s, p, 0) for s, p in enumerate(prompts)]
    pos = [len(p) for p in prompts]
    toks = [[], []]
    for _ in range(8):
        t = [int(np.argmax(l)) for l in logits]
        for s in range(2):
            toks[s].append(t[s])
        out = gpu.decode_batch(np.array([0, 1], np.int32), np.array(t, np.int32), np.array(pos, np.int32))
        logits = [out[0], out[1]]
        pos = [p + 1 for p in pos]
    assert toks == ref
    gpu.close()


# ------------------------------------------------------------------ fused decode step, graphs, PDL

FAST_TYPES = ["Q4_K", "Q5_0", "Q8_0", "Q6_K", "Q4_0", "F16", "F32", "BF16", "Q3_K", "Q5_K", "Q2_K", "Q4_1"]


def _fast_engine(path, n_ctx=64, n_slots=1):
    e = cu.CudaEngine(path, n_ctx, n_slots)
    p = e.paths()
    if not p["fast_decode_available"]:
        e.close()
        pytest.skip(f"fused decode not available here: {p['note']}")
    assert p["fast_decode"], p
    return e


@pytest.mark.parametrize("wtype", FAST_TYPES)
def test_fast_decode_matches_matvec_path(tiny_model, wtype):
    """Single-token steps through the fused decode kernels (int8 code planes for
    the quantized types, float32 for the rest) against the float32 mat-vec path,
    both fed the same tokens; the prompt's last logits use the fused lm_head."""
    path = tiny_model(wtype)
    fast = _fast_engine(path)
    slow = cu.CudaEngine(path, 64, 1)
    slow.set_options(fast_decode=False)
    assert not slow.paths()["fast_decode"]
    prompt = np.random.default_rng(11).integers(0, fast.n_vocab, 11).astype(np.int32)
    lf, ls = fast.forward(0, prompt, 0), slow.forward(0, prompt, 0)
    assert_close_rows(lf, ls, "prompt logits", cos_min=0.99999)
    pos = len(prompt)
    for step in range(10):
        t = np.array([int(np.argmax(ls))], np.int32)
        lf, ls = fast.forward(0, t, pos), slow.forward(0, t, pos)
        pos += 1
        assert_close_rows(lf, ls, f"step {step}", cos_min=0.99999)
    fast.close()
    slow.close()


def test_fast_decode_long_context(tiny_model):
    """Decode steps over a 1100-position cache: the fused attention's split length
    grows past one tile (32 blocks per KV head at most)."""
    path = tiny_model("Q8_0")
    fast = _fast_engine(path, 1400)
    slow = cu.CudaEngine(path, 1400, 1)
    slow.set_options(fast_decode=False)
    toks = np.random.default_rng(12).integers(0, fast.n_vocab, 1100).astype(np.int32)
    fast.forward(0, toks, 0)
    ls = slow.forward(0, toks, 0)
    pos = len(toks)
    for step in range(3):
        t = np.array([int(np.argmax(ls))], np.int32)
        lf, ls = fast.forward(0, t, pos), slow.forward(0, t, pos)
        pos += 1
        assert_close_rows(lf, ls, f"decode at {pos}", cos_min=0.99999)
    fast.close()
    slow.close()


def test_fast_decode_attention_variants(tiny_model):
    """The decode attention's variants against the mat-vec path at cache lengths on
    both sides of every boundary: one split (direct output), several splits merged
    in a thread-block cluster (Hopper, up to options' cluster_keys positions),
    the split merge through global memory (longer caches, or the cluster off), and
    splits longer than the ring of K/V tile buffers (kDecAttnBufs = 4 tiles: the
    ring wraps)."""
    _check_attention_variants(tiny_model("Q8_0"), variants={
        # one block per KV head up to direct_keys, then one cluster of 16 on tensor cores
        "default": ({}, [1, 2, 8, 9, 17, 32, 33, 40, 65, 128, 129, 256, 257, 300, 512, 513, 700, 1024, 1025, 1100]),
        "no cluster": (dict(cluster_keys=0, direct_keys=0), [1, 33, 300]),
        "long splits": (dict(cluster_keys=0, split_keys=256), [200, 300, 1100]),
        "one block": (dict(direct_keys=2000), [1, 9, 40, 300, 1100]),
        # the cluster's blocks on CUDA cores or the tensor-core tile phase, 8 or 16 blocks a cluster
        "cluster 8 cuda cores": (dict(cluster_size=8, cluster_mma=False, direct_keys=0), [1, 2, 9, 17, 40, 300, 1100]),
        "cluster 8 mma": (dict(cluster_size=8, direct_keys=0), [1, 2, 9, 17, 40, 300, 1100]),
        "cluster 16 cuda cores": (dict(cluster_mma=False, direct_keys=0), [9, 300, 1024]),
        # several clusters per KV head (the fewest, a power of two, of at most cluster_span
        # positions each; at most 16 and 64 blocks in all): attn_output merges their partials
        "multi-cluster": (dict(cluster_span=100, direct_keys=0), [1, 9, 100, 101, 150, 201, 300, 401, 700, 1100]),
        "16 one-block clusters": (dict(cluster_size=1, cluster_span=64, direct_keys=0),
                                  [1, 9, 64, 65, 129, 300, 700, 1025, 1100]),
        "16 clusters of 2": (dict(cluster_size=2, cluster_span=32, direct_keys=128), [129, 513, 700, 1100]),
        "multi-cluster cuda cores": (dict(cluster_span=128, cluster_mma=False, cluster_size=8, direct_keys=128),
                                     [129, 300, 1100]),
        # past the one-block attention every kernel (or q/k/v, attention and attn_output) releasing
        # its successor at its start: a timing choice, the same results
        "cluster, all released early": (dict(direct_keys=0, pdl_early_kinds_deep=63), [1, 9, 300, 1100]),
        "multi-cluster, released early": (dict(cluster_span=100, direct_keys=0, pdl_early_kinds_deep=7),
                                          [1, 101, 401, 1100]),
    })


@pytest.mark.parametrize("wtype,shape", [
    ("Q4_K", dict(n_head=8, n_head_kv=1)),  # one KV head, 8 query heads per group
    ("Q5_0", dict(n_head=8, n_head_kv=4)),  # 4 KV heads: 4 clusters
    ("F32", dict(n_head=4, n_head_kv=2)),   # the generic (any type) projection instances
])
def test_fast_decode_attention_shapes(tiny_model, wtype, shape):
    """The decode attention for other head shapes and weight types, against the
    mat-vec path, on both sides of the split boundaries."""
    _check_attention_variants(tiny_model(wtype, **shape), variants={"default": ({}, [1, 9, 40, 300, 1100])})


def _check_attention_variants(path, variants):
    n_ctx = 1200
    slow = cu.CudaEngine(path, n_ctx, 1)
    slow.set_options(fast_decode=False)
    toks = np.random.default_rng(21).integers(0, slow.n_vocab, n_ctx).astype(np.int32)
    for name, (opts, lengths) in variants.items():
        fast = _fast_engine(path, n_ctx)
        fast.set_options(**opts)
        assert all(fast.options()[k] == v for k, v in opts.items()), (opts, fast.options())
        for kv in lengths:
            # the first kv-1 tokens as a prompt, then one fused decode step at pos kv-1
            if kv > 1:
                fast.forward(0, toks[: kv - 1], 0)
                slow.forward(0, toks[: kv - 1], 0)
            t = toks[kv - 1 : kv]
            lf, ls = fast.forward(0, t, kv - 1), slow.forward(0, t, kv - 1)
            assert_close_rows(lf, ls, f"{name}: decode step with {kv} cached positions", cos_min=0.99999)
        fast.close()
    slow.close()


def _hopper() -> bool:
    return int(cu.device_info()["compute_capability"].split(".")[0]) >= 9


def test_fast_decode_attention_staged(tiny_model):
    """The cluster attention whose blocks copy their keys' K/V rows into shared memory before
    they wait (options' attn_stage; head_dim 64, so the tensor-core tile phase) against the
    mat-vec path: one cluster, more clusters so that a block's keys fit, and caches past the
    most clusters (blocks whose keys do not fit read the cache). Where the clusters are the
    same as without staging the logits are bitwise those of the unstaged engine (the same
    products in the same order), in single steps and in decode_greedy's graphs."""
    if not _hopper():
        pytest.skip("the cluster attention needs compute capability 9.0")
    path = tiny_model("Q8_0", n_embd=256, n_head=4, n_head_kv=2)
    _check_attention_variants(path, variants={
        "staged": (dict(attn_stage=256, direct_keys=0), [1, 2, 9, 33, 300, 1100]),
        "staged, more clusters": (dict(attn_stage=16, direct_keys=0), [1, 9, 17, 256, 257, 600, 1100]),
        "staged, cluster 8": (dict(attn_stage=40, cluster_size=8, direct_keys=0), [1, 100, 321, 700, 1100]),
        "staged past one block": (dict(attn_stage=64), [512, 513, 1100]),
    })
    toks = np.random.default_rng(5).integers(0, 200, 1100).astype(np.int32)
    runs = []
    for stage in (0, 256):
        e = _fast_engine(path, 1200)
        e.set_options(attn_stage=stage, direct_keys=0)
        assert e.options()["attn_stage"] == stage
        logits = [e.forward(0, toks[:n], 0)[-1:] for n in (40, 700, 1100)]
        first = int(np.argmax(e.forward(0, toks[:600], 0)))
        runs.append((np.concatenate(logits), e.decode_greedy(0, first, 600, 24)))
        e.close()
    np.testing.assert_array_equal(runs[1][0], runs[0][0])
    np.testing.assert_array_equal(runs[1][1], runs[0][1])


def test_fast_decode_kv_prefetch(tiny_model):
    """The cache rows pulled into L2 a layer ahead by the previous layer's ffn_down (options'
    kv_prefetch 1: the attention then skips its own prefetch; 2: both) move bytes, not maths:
    against the mat-vec path in one cluster and several, and bitwise the logits and tokens of the
    default, in single steps and in decode_greedy's graphs (head_dim 64: the lean instances)."""
    if not _hopper():
        pytest.skip("the cluster attention needs compute capability 9.0")
    path = tiny_model("Q8_0", n_embd=256, n_head=4, n_head_kv=2)
    lengths = [1, 2, 33, 300, 513, 1100]
    _check_attention_variants(path, variants={
        f"kv_prefetch {m}": (dict(kv_prefetch=m, direct_keys=0, cluster_span=512), lengths) for m in (1, 2)})
    toks = np.random.default_rng(7).integers(0, 200, 1100).astype(np.int32)
    runs = []
    for mode in (0, 1, 2):
        e = _fast_engine(path, 1200)
        e.set_options(kv_prefetch=mode, direct_keys=0, cluster_span=512)
        assert e.options()["kv_prefetch"] == mode
        logits = [e.forward(0, toks[:n], 0)[-1:] for n in (40, 700, 1100)]
        first = int(np.argmax(e.forward(0, toks[:600], 0)))
        runs.append((np.concatenate(logits), e.decode_greedy(0, first, 600, 24)))
        e.close()
    for mode in (1, 2):
        np.testing.assert_array_equal(runs[mode][0], runs[0][0], err_msg=f"kv_prefetch {mode}")
        np.testing.assert_array_equal(runs[mode][1], runs[0][1], err_msg=f"kv_prefetch {mode}")


@pytest.mark.parametrize("wtype", ["Q4_K", "Q5_0", "F16"])
def test_decode_graph_equals_direct(tiny_model, wtype):
    """The decode step replayed from a CUDA graph, launched directly, with and
    without programmatic dependent launch: the same kernels, so bitwise the same
    logits and tokens; decode_greedy (argmax on the GPU) == forward + argmax."""
    path = tiny_model(wtype)
    prompt = np.random.default_rng(13).integers(0, 200, 9).astype(np.int32)
    # (pdl_early_kinds: which kernels release their successor at their start, none or all: a
    # timing choice only, since every kernel waits for its predecessor before reading its output;
    # lm_bulk, the default: the lm_head's rows copied by the copy engine; off: each lane's cp.async,
    # the same bytes)
    variants = [dict(graphs=True, pdl=True), dict(graphs=False, pdl=True), dict(graphs=True, pdl=False),
                dict(graphs=False, pdl=False), dict(graphs=True, pdl=True, pdl_early_kinds=0),
                dict(graphs=True, pdl=True, pdl_early_kinds=63), dict(graphs=True, pdl=True, lm_bulk=False),
                dict(graphs=False, pdl=False, lm_bulk=False)]
    results = []
    for opts in variants:
        e = _fast_engine(path)
        e.set_options(**opts)
        first = int(np.argmax(e.forward(0, prompt, 0)))
        toks = e.decode_greedy(0, first, len(prompt), 12)
        assert toks.dtype == np.int32 and toks.shape == (12,)
        logits, t = [], first
        for i in range(12):
            lg = e.forward(0, np.array([t], np.int32), len(prompt) + i)
            logits.append(lg)
            t = int(np.argmax(lg))
        results.append((toks, np.stack(logits), e.paths()))
        e.close()
    toks0, logits0, paths0 = results[0]
    assert paths0["graphs"], paths0
    if paths0["pdl_available"] and not paths0["pdl"]:
        import warnings
        warnings.warn(f"PDL is off on this GPU: {paths0['note']}")
    assert list(toks0) == [int(np.argmax(lg)) for lg in logits0], "decode_greedy != forward + argmax"
    for (toks, logits, _), opts in zip(results[1:], variants[1:]):
        assert np.array_equal(toks, toks0), f"{opts}: tokens differ"
        assert np.array_equal(logits.view(np.uint32), logits0.view(np.uint32)), f"{opts}: logits not bitwise equal"


def test_fast_decode_slots(tiny_model):
    """The fused step reads the slot from the device state: two sequences in a
    two-slot engine, stepped alternately, == each in its own engine (bitwise)."""
    path = tiny_model("Q4_K")
    rng = np.random.default_rng(14)
    prompts = [rng.integers(0, 200, 7).astype(np.int32), rng.integers(0, 200, 12).astype(np.int32)]
    two = _fast_engine(path, 64, 2)
    ones = [_fast_engine(path, 64, 1) for _ in prompts]
    last = []
    for s, p in enumerate(prompts):
        a, b = two.forward(s, p, 0), ones[s].forward(0, p, 0)
        assert np.array_equal(a, b)
        last.append(int(np.argmax(a)))
    pos = [len(p) for p in prompts]
    for step in range(6):
        for s in (1, 0):
            t = np.array([last[s]], np.int32)
            a, b = two.forward(s, t, pos[s]), ones[s].forward(0, t, pos[s])
            assert np.array_equal(a, b), f"slot {s} step {step}"
            last[s] = int(np.argmax(a))
            pos[s] += 1
    # decode_greedy on slot 1 continues that sequence
    got = two.decode_greedy(1, last[1], pos[1], 5)
    ref = ones[1].decode_greedy(0, last[1], pos[1], 5)
    assert np.array_equal(got, ref)
    for e in [two] + ones:
        e.close()


def test_decode_greedy_errors_and_fallback(tiny_model):
    path = tiny_model("Q4_0")
    gpu = cu.CudaEngine(path, 32, 2)
    V = gpu.n_vocab
    assert gpu.decode_greedy(0, 1, 0, 0).shape == (0,)
    with pytest.raises(ValueError, match="slot"):
        gpu.decode_greedy(2, 1, 0, 3)
    with pytest.raises(ValueError, match="n_ctx"):
        gpu.decode_greedy(0, 1, 30, 3)
    with pytest.raises(ValueError, match="token id"):
        gpu.decode_greedy(0, V, 0, 3)
    # with the fused path off, decode_greedy runs the one-row batch step and the device's first
    # maximum: each token is the top logit of that step as forward computes it, up to the
    # rounding between the two paths (a token within 1e-3 of the top counts)
    gpu.set_options(fast_decode=False)
    gpu.forward(0, np.arange(5, dtype=np.int32), 0)
    got = [int(x) for x in gpu.decode_greedy(0, 7, 5, 6)]
    gpu.forward(0, np.arange(5, dtype=np.int32), 0)
    t = 7
    for i, g in enumerate(got):
        lg = gpu.forward(0, np.array([t], np.int32), 5 + i)
        top = float(lg.max())
        assert lg[g] >= top - 1e-3 * max(1.0, abs(top)), (i, g, int(np.argmax(lg)), float(lg[g]), top)
        t = g
    gpu.close()


def test_options_and_environment(tiny_model, monkeypatch):
    """options() reports what set_options set (None leaves a field as is); the test hooks
    are checked (a clear ValueError naming the field, the options unchanged); a new engine
    starts from the ORCD_CUDA_* switches of the environment."""
    for name in ("ORCD_CUDA_FAST_DECODE", "ORCD_CUDA_GRAPHS", "ORCD_CUDA_PDL", "ORCD_CUDA_FUSED_PROMPT",
                 "ORCD_CUDA_BATCH_GRAPHS", "ORCD_CUDA_RESIDENT_F16", "ORCD_CUDA_SAMPLE_SPLIT", "ORCD_CUDA_SAMPLE_GRAPHS",
                 "ORCD_CUDA_SAMPLE_SPLIT_FULL", "ORCD_CUDA_VRAM_LIMIT", "ORCD_CUDA_CLUSTER_SIZE", "ORCD_CUDA_CLUSTER_SPAN",
                 "ORCD_CUDA_DIRECT_KEYS", "ORCD_CUDA_PDL_EARLY_KINDS", "ORCD_CUDA_PDL_EARLY_KINDS_DEEP",
                 "ORCD_CUDA_ATTN_STAGE", "ORCD_CUDA_LM_BULK", "ORCD_CUDA_KV_PREFETCH"):
        monkeypatch.delenv(name, raising=False)
    path = tiny_model("Q4_0")
    e = cu.CudaEngine(path, 32, 1)
    base = e.options()
    assert base == dict(fast_decode=True, graphs=True, pdl=True, fused_prompt=True, batch_graphs=True,
                        resident_f16=True, sample_split=True, sample_graphs=True, sample_split_full=False,
                        cluster_keys=1 << 30, split_keys=32, cluster_size=16,
                        cluster_mma=True, cluster_span=8192, direct_keys=512, pdl_early_kinds=-1,
                        pdl_early_kinds_deep=-1, attn_stage=0, lm_bulk=True, kv_prefetch=1, attn_trace=False,
                        vram_limit=0), base
    e.set_options(graphs=False, cluster_keys=0, split_keys=64)
    assert e.options() == dict(base, graphs=False, cluster_keys=0, split_keys=64)
    assert not e.paths()["graphs"]
    for bad, field in [(dict(split_keys=48), "split_keys"), (dict(split_keys=0), "split_keys"),
                       (dict(cluster_keys=-1), "cluster_keys"), (dict(cluster_size=0), "cluster_size"),
                       (dict(cluster_size=17), "cluster_size"), (dict(cluster_span=0), "cluster_span"),
                       (dict(direct_keys=-1), "direct_keys"), (dict(pdl_early_kinds=64), "pdl_early_kinds"),
                       (dict(pdl_early_kinds=-2), "pdl_early_kinds"), (dict(pdl_early_kinds_deep=64), "pdl_early_kinds_deep"),
                       (dict(attn_stage=-1), "attn_stage"), (dict(kv_prefetch=3), "kv_prefetch"),
                       (dict(kv_prefetch=-1), "kv_prefetch")]:
        with pytest.raises(ValueError, match=field):
            e.set_options(**bad)
    assert e.options() == dict(base, graphs=False, cluster_keys=0, split_keys=64)
    e.close()
    monkeypatch.setenv("ORCD_CUDA_GRAPHS", "0")
    monkeypatch.setenv("ORCD_CUDA_FUSED_PROMPT", "false")
    monkeypatch.setenv("ORCD_CUDA_SAMPLE_GRAPHS", "0")
    monkeypatch.setenv("ORCD_CUDA_SAMPLE_SPLIT_FULL", "1")
    monkeypatch.setenv("ORCD_CUDA_LM_BULK", "0")
    e = cu.CudaEngine(path, 32, 1)
    assert e.options() == dict(base, graphs=False, fused_prompt=False, sample_graphs=False, sample_split_full=True,
                               lm_bulk=False)
    assert not e.paths()["graphs"] and not e.paths()["fused_prompt"]
    e.close()
    # the integer settings: the decode attention's cluster shape, the early PDL releases
    monkeypatch.setenv("ORCD_CUDA_CLUSTER_SIZE", "2")
    monkeypatch.setenv("ORCD_CUDA_CLUSTER_SPAN", "512")
    monkeypatch.setenv("ORCD_CUDA_PDL_EARLY_KINDS", "5")
    monkeypatch.setenv("ORCD_CUDA_PDL_EARLY_KINDS_DEEP", "7")
    monkeypatch.setenv("ORCD_CUDA_ATTN_STAGE", "256")
    monkeypatch.setenv("ORCD_CUDA_KV_PREFETCH", "2")
    e = cu.CudaEngine(path, 32, 1)
    assert e.options()["cluster_size"] == 2 and e.options()["cluster_span"] == 512
    assert e.options()["pdl_early_kinds"] == 5 and e.options()["pdl_early_kinds_deep"] == 7
    assert e.options()["attn_stage"] == 256 and e.options()["kv_prefetch"] == 2
    e.close()
    for name, bad in (("ORCD_CUDA_KV_PREFETCH", "3"), ("ORCD_CUDA_CLUSTER_SIZE", "17"), ("ORCD_CUDA_CLUSTER_SIZE", "two"), ("ORCD_CUDA_CLUSTER_SPAN", "0"),
                      ("ORCD_CUDA_PDL_EARLY_KINDS", "64")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            cu.CudaEngine(path, 32, 1)
        monkeypatch.setenv(name, {"ORCD_CUDA_CLUSTER_SIZE": "2", "ORCD_CUDA_CLUSTER_SPAN": "512",
                                  "ORCD_CUDA_KV_PREFETCH": "1"}.get(name, "5"))


def test_vram_limit_plans_as_a_smaller_gpu(tiny_model, monkeypatch):
    """ORCD_CUDA_VRAM_LIMIT: the engine plans as if the GPU had that much free: the automatic
    KV pool shrinks to what fits (never below one sequence) and the resident fp16 copy stays
    off; the text is the same as without the limit; a value that is not a size is a clear error."""
    for name in ("ORCD_CUDA_VRAM_LIMIT", "ORCD_CUDA_RESIDENT_F16"):
        monkeypatch.delenv(name, raising=False)
    path = tiny_model("Q8_0")
    free = cu.CudaEngine(path, 4096, 64)
    fi = free.info()
    assert fi["kv_pool_positions"] == 64 * 4096 and fi["vram_resident_f16"] > 0
    toks = np.arange(1, 20, dtype=np.int32)
    want = free.forward(0, toks, 0)
    free.close()
    monkeypatch.setenv("ORCD_CUDA_VRAM_LIMIT", "160MiB")  # the 64 x 4096 pool (64 MiB) does not fit beside the rest
    small = cu.CudaEngine(path, 4096, 64)
    si = small.info()
    assert small.options()["vram_limit"] == 160 << 20
    assert 4096 <= si["kv_pool_positions"] < 64 * 4096, si
    assert si["vram_resident_f16"] == 0 and si["vram_bytes"] <= 160 << 20, si
    np.testing.assert_allclose(small.forward(0, toks, 0), want, rtol=2e-3, atol=2e-3)
    small.close()
    for bad in ("lots", "4X", "0", "-1G"):
        monkeypatch.setenv("ORCD_CUDA_VRAM_LIMIT", bad)
        with pytest.raises(ValueError, match="ORCD_CUDA_VRAM_LIMIT"):
            cu.CudaEngine(path, 64, 1)


def test_profile_decode(tiny_model):
    """profile_decode: per-kernel-kind times of real steps, and the greedy tokens it
    leaves in the cache do not disturb later use."""
    path = tiny_model("Q5_0")
    e = _fast_engine(path)
    e.forward(0, np.arange(1, 6, dtype=np.int32), 0)
    prof = e.profile_decode(0, 7, 5, 4)
    kinds = ["qkv", "attention", "attn_output", "ffn_gate_up", "ffn_down", "lm_head"]
    assert list(cu.decode_kernel_kinds) == kinds
    assert set(prof) == set(kinds) | {"graph_step", "noop_step", "noop_step_nopdl"} | {"marginal_" + k for k in kinds}
    # marginals are differences of two timings: finite, the rest positive
    assert all(v > 0 for k, v in prof.items() if not k.startswith("marginal_")), prof
    assert all(np.isfinite(v) for v in prof.values()), prof
    with pytest.raises(ValueError, match="n_ctx"):
        e.profile_decode(0, 7, 62, 4)
    e.close()


@pytest.mark.parametrize("stage", [0, 64])
def test_profile_decode_attention_trace(tiny_model, stage):
    """options' attn_trace: profile_decode returns the cluster attention's timestamps per
    block, in the order of the kernel's phases (on the global timer and on the block's SM's
    cycle counter), each block's SM, and within each cluster no block past the cluster
    barrier before every block reached it."""
    if not _hopper():
        pytest.skip("the cluster attention needs compute capability 9.0")
    n_layer, n_head_kv, clock = 2, 2, 11
    e = _fast_engine(tiny_model("Q8_0", n_embd=256, n_head=4, n_head_kv=2), 128)
    e.forward(0, np.arange(1, 41, dtype=np.int32), 0)
    assert "attn_trace" not in e.profile_decode(0, 7, 40, 2)
    e.set_options(direct_keys=0, attn_trace=True, attn_stage=stage)
    prof = e.profile_decode(0, 7, 40, 2)
    gx, fields = prof["attn_grid_x"], prof["attn_trace_fields"]
    assert gx in (8, 16), gx
    assert fields >= clock + 12, fields
    # (int64: differences of unsigned timestamps would wrap instead of going negative)
    tr = np.array(prof["attn_trace"], dtype=np.int64).reshape(n_layer, -1, fields)
    sms = cu.device_info()["sm_count"]
    for layer in range(n_layer):
        for y in range(n_head_kv):
            blocks = tr[layer, y * gx:(y + 1) * gx]
            # 41..48 keys over the cluster's blocks in splits of 8: the first 6 hold keys
            active = blocks[:6]
            # (fields: start, waited, ready, partial merged, cluster barrier, merge stored, end, SM,
            # tiles done, warps' partials stored, merge inputs loaded)
            assert np.all(blocks[:, 0] > 0) and np.all(np.diff(blocks[:, [0, 1, 4, 10, 5, 6]], axis=1) >= 0), blocks
            assert np.all(np.diff(active[:, [1, 2, 8, 9, 3]], axis=1) >= 0), active
            # the same marks' cycle counts (field clock + mark): every block's own order, and a
            # block's run takes cycles
            cyc = blocks[:, clock:clock + 11]
            assert np.all(cyc[:, 0] > 0) and np.all(np.diff(cyc[:, [0, 1, 4, 10, 5, 6]], axis=1) >= 0), cyc
            assert np.all(np.diff(active[:, clock:clock + 11][:, [1, 2, 8, 9, 3]], axis=1) >= 0), active
            assert np.all(cyc[:, 6] > cyc[:, 0])
            # the push merge's cluster barrier wait returned between marks 9 and 3 (field clock + 11)
            waited = active[:, clock + 11]
            assert np.all(active[:, clock + 9] <= waited) and np.all(waited <= active[:, clock + 3]), active
            assert active[:, 3].max() <= blocks[:, 4].min(), "a block passed the cluster barrier early"
            assert np.all(blocks[:, 7] < sms)
    e.close()


def test_real_model_decode_greedy(real_model_path):
    """decode_greedy on the real model == the forward + argmax loop (same fused
    kernels; the loop is compared with the CPU in test_real_model_greedy_32_steps)."""
    gpu = cu.CudaEngine(real_model_path, 256, 1)
    for prompt in _real_prompts(real_model_path)[:3]:
        toks, _ = _greedy(gpu, 0, prompt, 32)
        gpu.forward(0, prompt, 0)
        got = gpu.decode_greedy(0, toks[0], len(prompt), 31)
        assert list(got) == toks[1:]
    gpu.close()
