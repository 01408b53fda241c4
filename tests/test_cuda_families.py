"""The other families on the CUDA engine (skipped without a usable GPU).

llama (normal RoPE pairing, no biases, tied output) runs in the generic step:
per-layer hidden states and logits against the CPU engine (cosine >= 0.999, same
argmax) with the fused prompt path on and off, and decode_batch; and on the fused
single-sequence decoder (the normal pairing in its Q/K kernel), step by step against
the mat-vec path and the CPU engine. phi3 (fused attn_qkv and gate|up, read as row
slices of one tensor; a sliding window on every layer) runs in the generic step, held
to the same bounds with a window that bites: head_dim 64 takes the tensor-core prompt
attention and the decode-shaped kernel (rows_attn), head_dim 16 the CUDA-core split
kernel, each with the window cutting the keys. gemma3 (embedding scale, per-head Q/K
norms, local and global layers with their own RoPE bases and windows, a score scale,
post-norms, the GELU gate; n_head * head_dim != n_embd) runs in the generic step under the
same bounds at head_dim 32, 128 and 256, each of its features shown to move the logits, and
on the fused decoder step by step (every weight type, then each attention variant with a
window that cuts the keys). The fused decoder says why it is off for phi3; device="auto"
puts phi3 and gemma3 on the GPU. gpt-oss (sinks, windows, YaRN, biases, a mixture of experts routed on the host, MXFP4
experts) runs in the generic step under the same bounds (tests/test_families.py shows the CPU
engine's logits depend on each of those features); a feature still missing (logit soft-capping)
is refused by name. The real SmolLM2 and Gemma 3 files, when installed, give the CPU engine's
greedy tokens (on both decode paths).
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()

from orcd import _orcd as core  # noqa: E402
from test_cuda_engine import assert_close_rows  # noqa: E402
from test_families import _tokenizer, family_model, gemma3_path, ids_for, smollm2_path  # noqa: E402,F401

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


def compare(gpu, cpu, ids):
    gh, gl = gpu.trace(np.asarray(ids, np.int32))
    ch, cl = cpu.trace(np.asarray(ids, np.int32))
    for i, (g, c) in enumerate(zip(gh, ch)):
        assert_close_rows(g, c, f"hidden {i}")
    assert_close_rows(gl, cl, "logits")
    # the same pick, unless the CPU's own logits for the two picks are a near tie (tiny random
    # models have top-2 margins of 0.01; tests/test_cuda_engine.py explains the arbitration)
    for t, (g, c) in enumerate(zip(np.argmax(gl, -1), np.argmax(cl, -1))):
        assert g == c or cl[t, c] - cl[t, g] < 0.05, f"token {t}: GPU picks {g}, CPU {c}"


def compare_decode_batch(gpu, cpu, ids, n0, n1):
    """Slots 0 and 1 prompted with ids[:n0] and ids[:n1] on both engines, then one two-slot
    decode batch (the mat-vec path) at positions n0 and n1."""
    ids = np.asarray(ids, np.int32)
    for slot, n in ((0, n0), (1, n1)):
        gpu.forward(slot, ids[:n], 0)
        cpu.forward(slot, ids[:n], 0)
    args = (np.array([0, 1], np.int32), np.array([7, 9], np.int32), np.array([n0, n1], np.int32))
    assert_close_rows(gpu.decode_batch(*args), cpu.decode_batch(*args), "decode_batch")


@pytest.mark.parametrize("fused_prompt", [True, False])
@pytest.mark.parametrize("wtype", TYPES)
def test_llama_generic_step_matches_cpu(family_model, wtype, fused_prompt):
    path = family_model("llama", wtype, tied=wtype == "Q8_0")
    gpu = cu.CudaEngine(path, 64, 2)
    gpu.set_options(fused_prompt=fused_prompt)
    cpu = core.CpuEngine(path, 64, 2)
    ids = ids_for(cpu, 11)
    compare(gpu, cpu, ids)
    compare_decode_batch(gpu, cpu, ids, 6, 4)


def test_fused_decoder_says_why_it_is_off(family_model):
    gpu = cu.CudaEngine(family_model("phi3", "F16", sliding_window=5), 32, 1)
    p = gpu.paths()
    assert not p["fast_decode_available"] and not p["fast_decode"]
    note = p["note"]
    assert "plain decoder layer" in note and "phi3 has fused attn_qkv, fused gate|up" in note, note
    gpu.close()


def compare_past_a_window(gpu, cpu):
    """The windowed families' parity run (window 5): a 150-token prompt (several key splits and
    tiles, most of them before every query's window), a 24-token one, a two-slot decode batch,
    then single-token steps past the window (slot 0 holds positions 0..20 by then)."""
    compare(gpu, cpu, ids_for(cpu, 150, seed=2))
    ids = ids_for(cpu, 24)
    compare(gpu, cpu, ids)
    compare_decode_batch(gpu, cpu, ids, 20, 9)
    for p in range(21, 30):
        tok = np.asarray([ids[p % 24]], np.int32)
        assert_close_rows(gpu.forward(0, tok, p)[None], cpu.forward(0, tok, p)[None], f"position {p}")


@pytest.mark.parametrize("wtype", ("F16", "F32", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"))
def test_llama_fused_decoder_matches_cpu(family_model, wtype):
    """llama on the fused single-sequence decoder (dec_qkv_kernel's normal RoPE pairing: rows
    2i and 2i+1 of a head rotated together; no biases; a tied output for Q8_0): single-token
    steps against the same engine's mat-vec path (fast_decode off) and the CPU engine, then
    decode_greedy's graphs of 8 steps give the single steps' tokens."""
    path = family_model("llama", wtype, tied=wtype == "Q8_0")
    fast = cu.CudaEngine(path, 64, 1)
    p = fast.paths()
    assert p["fast_decode_available"] and p["fast_decode"], p
    slow = cu.CudaEngine(path, 64, 1)
    slow.set_options(fast_decode=False)
    cpu = core.CpuEngine(path, 64, 1)
    prompt = np.asarray(ids_for(cpu, 11), np.int32)
    engines = (fast, slow, cpu)
    lf, ls, lc = (e.forward(0, prompt, 0) for e in engines)
    pos, picked = len(prompt), []
    for step in range(10):
        t = np.array([int(np.argmax(lf))], np.int32)
        picked.append(int(t[0]))
        lf, ls, lc = (e.forward(0, t, pos) for e in engines)
        pos += 1
        assert_close_rows(lf[None], ls[None], f"step {step}: fused vs mat-vec", cos_min=0.99999)
        assert_close_rows(lf[None], lc[None], f"step {step}: fused vs CPU")
    again = cu.CudaEngine(path, 64, 1)
    again.forward(0, prompt, 0)
    assert list(again.decode_greedy(0, picked[0], len(prompt), 9)) == picked[1:]
    for e in (fast, slow, cpu, again):
        e.close()


# phi3 shapes: head_dim 64 (n_embd 256, 4 heads; the tensor-core prompt attention and rows_attn)
# and 16 (n_embd 64; the CUDA-core split attention); window 5 bites in the 24- and 150-token
# prompts and in every decode step after them
PHI3_SHAPES = {"hd64": dict(n_embd=256, n_head=4, n_head_kv=2), "hd16": dict(n_embd=64, n_head=4, n_head_kv=2)}


@pytest.mark.parametrize("fused_prompt", [True, False])
@pytest.mark.parametrize("shape", sorted(PHI3_SHAPES))
@pytest.mark.parametrize("wtype", ("F32", "F16", "Q8_0", "Q4_K", "Q6_K"))
def test_phi3_generic_step_matches_cpu(family_model, wtype, shape, fused_prompt):
    dims = PHI3_SHAPES[shape]
    if wtype in ("Q4_K", "Q6_K") and dims["n_embd"] % 256:
        pytest.skip("K-quant rows need n_embd a multiple of 256")
    path = family_model("phi3", wtype, sliding_window=5, **dims)
    gpu = cu.CudaEngine(path, 256, 2)
    gpu.set_options(fused_prompt=fused_prompt)
    cpu = core.CpuEngine(path, 256, 2)
    compare_past_a_window(gpu, cpu)


# gemma3 shapes: head_dim 128 with n_head * head_dim (512) != n_embd (256) and 4 query heads a
# KV head (the tensor-core prompt attention), and head_dim 32 (the CUDA-core kernels); 4 layers,
# every second one local (window 5, RoPE base 1e4) and the others global (base 1e6), and
# query_pre_attn_scalar 48 (a score scale other than 1/sqrt(head_dim), folded into q)
GEMMA3_SHAPES = {"hd128": dict(n_embd=256, n_head=4, n_head_kv=1, head_dim=128),
                 "hd32": dict(n_embd=64, n_head=2, n_head_kv=1, head_dim=32),
                 "hd256": dict(n_embd=256, n_head=2, n_head_kv=1, head_dim=256)}  # the real 270M's head_dim
GEMMA3_LAYERS = dict(n_layer=4, sliding_window=5, window_pattern=2, rope_base=1e6, rope_base_swa=1e4,
                     query_pre_attn_scalar=48.0)


@pytest.mark.parametrize("shape", sorted(GEMMA3_SHAPES))
@pytest.mark.parametrize("wtype", ("F32", "F16", "Q8_0", "Q4_K", "Q6_K"))
def test_gemma3_generic_step_matches_cpu(family_model, wtype, shape):
    """gemma3 on the generic step (embedding scale, per-head Q/K norms, per-layer RoPE bases,
    the folded score scale, local windows, post-norms into the residual, the GELU gate):
    hidden states per layer and logits against the CPU engine for a 150- and a 24-token
    prompt, a two-slot decode batch, and single-token steps past the window."""
    dims = GEMMA3_SHAPES[shape]
    if wtype in ("Q4_K", "Q6_K") and dims["n_embd"] % 256:
        pytest.skip("K-quant rows need n_embd a multiple of 256")
    path = family_model("gemma3", wtype, **dims, **GEMMA3_LAYERS)
    gpu = cu.CudaEngine(path, 256, 2)
    gpu.set_options(fast_decode=False)  # the generic step (test_gemma3_fused_decoder_matches_cpu: the other)
    cpu = core.CpuEngine(path, 256, 2)
    assert not gpu.paths()["fast_decode"]
    compare_past_a_window(gpu, cpu)


# The fused decoder's attention variants (FusedDecoder::attn_variant): one block per KV head
# (the defaults over a 20-token prompt: up to 32 keys, where the CUDA-core shapes take it too;
# window 5), then with a 60-token prompt and a 40-key window cutting the local layers' keys: the
# global merge (splits of 32 keys on CUDA cores: 2 for a local layer, 3 for a global one); one
# 16-block cluster (splits of 8 keys); several clusters (cluster_span 16: at most 4 of 16 blocks)
# whose partials attn_output merges as it loads them
GEMMA3_FUSED_VARIANTS = {"one block": {}, "global merge": dict(cluster_keys=0, direct_keys=0),
                         "cluster": dict(direct_keys=0), "clusters": dict(direct_keys=0, cluster_span=16)}


def gemma3_fused_case(family_model, wtype, dims, variant, prompt_len=None, window=None, slot=0):
    """gemma3 on the fused single-sequence decoder (dec_qkv with the embedding scale, q and k
    raw into dec_qk_norm's per-head norm and RoPE, the post-norms added by the next kernel,
    the GELU gate, per-layer RoPE tables, windows in dec_attn): a 60-token prompt, then 10
    single-token steps against the same engine's mat-vec path (fast_decode off) and the CPU
    engine, and decode_greedy's graphs of 8 steps give the single steps' tokens (a 20-token
    prompt and window 5 for the one-block variant); in slot `slot` of slot + 1."""
    if wtype in ("Q4_K", "Q6_K") and dims["n_embd"] % 256:
        pytest.skip("K-quant rows need n_embd a multiple of 256")
    short = variant == "one block"
    window = window or (5 if short else 40)
    prompt_len = prompt_len or (20 if short else 60)
    path = family_model("gemma3", wtype, **dims, **dict(GEMMA3_LAYERS, sliding_window=window))
    opts = GEMMA3_FUSED_VARIANTS[variant]
    n_ctx, n_slots = 256, slot + 1
    fast = cu.CudaEngine(path, n_ctx, n_slots)
    fast.set_options(**opts)
    p = fast.paths()
    assert p["fast_decode_available"] and p["fast_decode"], p
    slow = cu.CudaEngine(path, n_ctx, n_slots)
    slow.set_options(fast_decode=False)
    cpu = core.CpuEngine(path, n_ctx, n_slots)
    prompt = np.asarray(ids_for(cpu, prompt_len, seed=3), np.int32)
    engines = (fast, slow, cpu)
    lf, ls, lc = (e.forward(slot, prompt, 0) for e in engines)
    pos, picked = len(prompt), []
    for step in range(10):
        t = np.array([int(np.argmax(lf))], np.int32)
        picked.append(int(t[0]))
        lf, ls, lc = (e.forward(slot, t, pos) for e in engines)
        pos += 1
        assert_close_rows(lf[None], ls[None], f"step {step}: fused vs mat-vec", cos_min=0.99999)
        assert_close_rows(lf[None], lc[None], f"step {step}: fused vs CPU")
    again = cu.CudaEngine(path, n_ctx, n_slots)
    again.set_options(**opts)
    again.forward(slot, prompt, 0)
    assert list(again.decode_greedy(slot, picked[0], len(prompt), 9)) == picked[1:]
    for e in (fast, slow, cpu, again):
        e.close()


@pytest.mark.parametrize("shape", sorted(GEMMA3_SHAPES))
@pytest.mark.parametrize("wtype", ("F32", "F16", "Q8_0", "Q4_K", "Q6_K"))
def test_gemma3_fused_decoder_matches_cpu(family_model, wtype, shape):
    gemma3_fused_case(family_model, wtype, GEMMA3_SHAPES[shape], "one block")


@pytest.mark.parametrize("variant", sorted(set(GEMMA3_FUSED_VARIANTS) - {"one block"}))
@pytest.mark.parametrize("shape", sorted(GEMMA3_SHAPES))
def test_gemma3_fused_attention_variants_match_cpu(family_model, shape, variant):
    gemma3_fused_case(family_model, "Q8_0", GEMMA3_SHAPES[shape], variant)


@pytest.mark.parametrize("shape", sorted(GEMMA3_SHAPES))
def test_gemma3_fused_long_windowed_merge_in_slot_1(family_model, shape):
    """The global merge past the tensor-core split size (a 200-token prompt: head_dim 128's
    splits hold at least 128 keys, so 2 splits for the 150-key window and for the global
    layers), in the second slot (the slot's offset in the pool)."""
    gemma3_fused_case(family_model, "Q8_0", GEMMA3_SHAPES[shape], "global merge", prompt_len=200, window=150, slot=1)


@pytest.mark.parametrize("variant", sorted(GEMMA3_FUSED_VARIANTS))
def test_gemma3_fused_two_kv_heads(family_model, variant):
    """Two KV heads (dec_qk_norm's KV-head blocks, the attention's per-KV-head grid and
    counters), head_dim 64 (the tensor-core phase), each attention variant."""
    gemma3_fused_case(family_model, "Q8_0", dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=64), variant)


def test_gemma3_ops_are_what_the_gpu_computes(family_model):
    """Each gemma3 feature changes the GPU's logits (so the parity above is not a feature both
    engines ignore): the same weights without the window, with one RoPE base, or without the
    score scale give other logits."""
    dims = GEMMA3_SHAPES["hd128"]
    ids = np.arange(3, 27, dtype=np.int32)
    base = cu.CudaEngine(family_model("gemma3", "F16", **dims, **GEMMA3_LAYERS), 64, 1).forward(0, ids, 0)
    for change in (dict(sliding_window=0), dict(rope_base_swa=1e6), dict(query_pre_attn_scalar=128.0)):
        other = cu.CudaEngine(family_model("gemma3", "F16", **dims, **dict(GEMMA3_LAYERS, **change)), 64, 1)
        got = other.forward(0, ids, 0)
        assert np.abs(got - base).max() > 1e-3 * np.abs(base).max(), change


@pytest.mark.parametrize("fused_decoder", [False, True])
def test_real_gemma3_greedy_equals_cpu(gemma3_path, fused_decoder):
    cpu = core.CpuEngine(gemma3_path, 128, 1)
    gpu = cu.CudaEngine(gemma3_path, 128, 1)
    gpu.set_options(fast_decode=fused_decoder)
    assert gpu.paths()["fast_decode"] == fused_decoder, gpu.paths()
    ids = np.asarray(_tokenizer(gemma3_path).encode("The capital of France is"), np.int32)
    t_cpu = int(np.argmax(cpu.forward(0, ids, 0)))
    t_gpu = int(np.argmax(gpu.forward(0, ids, 0)))
    assert t_cpu == t_gpu
    assert list(gpu.decode_greedy(0, t_gpu, len(ids), 16)) == list(cpu.decode_greedy(0, t_cpu, len(ids), 16))


def test_phi3_window_is_what_the_gpu_computes(family_model):
    """The window matters on the GPU too: the same weights without the window key give other
    logits past position 5 (so the parity above is not a window both engines ignore)."""
    dims = PHI3_SHAPES["hd64"]
    with_w = cu.CudaEngine(family_model("phi3", "F16", sliding_window=5, **dims), 64, 1)
    without = cu.CudaEngine(family_model("phi3", "F16", sliding_window=0, **dims), 64, 1)
    ids = np.arange(3, 27, dtype=np.int32)
    a, b = with_w.forward(0, ids, 0), without.forward(0, ids, 0)
    assert np.abs(a - b).max() > 1e-3 * np.abs(b).max()


def test_logit_softcapping_is_refused_by_name(family_model):
    """A feature the CUDA engine still lacks (final logit soft-capping) is a ValueError naming it."""
    with pytest.raises(ValueError, match="the CUDA engine does not run gemma3 models yet .*logit soft-capping"):
        cu.CudaEngine(family_model("gemma3", "F16", logit_softcap=3.0, head_dim=32), 16, 1)


# gpt-oss: 4 layers, windows of 4 on layers 0 and 2, YaRN (factor 32 over 64 original positions,
# which bites at these positions), a sink per head, Q/K/V/O biases, 4 experts of which the router
# takes 2 per token (tests/tiny_models.py)
GPTOSS = {"n_layer": 4, "sliding_window": 4}
MXFP4_EXPERTS = {f"ffn_{m}_exps.weight": "MXFP4" for m in ("gate", "up", "down")}


@pytest.mark.parametrize("wtype,types", [("F32", None), ("F16", None), ("Q8_0", None), ("MXFP4", None),
                                         ("F16", MXFP4_EXPERTS)],
                         ids=["F32", "F16", "Q8_0", "MXFP4", "F16+MXFP4-experts"])
def test_gptoss_matches_cpu(family_model, wtype, types):
    """Per-layer hidden states and logits of a 14-token prompt against the CPU engine (the window
    and the sinks in the attention, YaRN in the RoPE, the router's weights, each expert's
    gather / biases / swiglu_oai / weighted scatter, the experts read as stored: MXFP4 dequantized
    on the GPU), then single-token steps and a two-slot decode batch. Every expert is used
    (n_expert_used = n_expert): the router's weights stay continuous, so the GPU's rounding
    (its fp16 KV cache) cannot flip a near-tied pick the way it could at 2 of 4 (below)."""
    path = family_model("gpt-oss", wtype, tensor_types=types, n_expert_used=4, **GPTOSS)
    gpu = cu.CudaEngine(path, 64, 2)
    cpu = core.CpuEngine(path, 64, 2)
    ids = ids_for(cpu, 14)
    compare(gpu, cpu, ids)
    gpu.forward(0, np.asarray(ids, np.int32), 0)
    cpu.forward(0, np.asarray(ids, np.int32), 0)
    for step, t in enumerate((5, 17, 3)):
        tok = np.array([t], np.int32)
        assert_close_rows(gpu.forward(0, tok, len(ids) + step)[None], cpu.forward(0, tok, len(ids) + step)[None],
                          f"step {step}")
    compare_decode_batch(gpu, cpu, ids, 9, 13)
    paths = gpu.paths()
    assert not paths["fast_decode"], paths  # the generic step runs it, and says why
    gpu.close()
    cpu.close()


def test_gptoss_top2_routing_matches_cpu(family_model):
    """2 of 4 experts a token (the picks differ between tokens: tests/test_families.py): the
    final logits of a 14-token prompt against the CPU engine row by row. A pick the two engines'
    rounding splits differently (a router near-tie) moves one row; a wrong routing on the GPU
    (picks, weights, rows) moves most of them, so at most 2 rows may differ."""
    path = family_model("gpt-oss", "F32", **GPTOSS)
    gpu, cpu = cu.CudaEngine(path, 64, 1), core.CpuEngine(path, 64, 1)
    ids = np.asarray(ids_for(cpu, 14), np.int32)
    _, gl = gpu.trace(ids)
    _, cl = cpu.trace(ids)
    gl, cl = np.asarray(gl, np.float64), np.asarray(cl, np.float64)
    cos = (gl * cl).sum(-1) / (np.linalg.norm(gl, axis=-1) * np.linalg.norm(cl, axis=-1))
    assert np.count_nonzero(cos < 0.999) <= 2, cos
    gpu.close()
    cpu.close()


def test_auto_device_puts_gptoss_on_the_gpu(family_model):
    """gpt-oss runs on CUDA now: device="auto" takes it there (Model and BatchRunner), with the
    CPU's logits."""
    import orcd
    from orcd.batch import BatchRunner
    path = family_model("gpt-oss", "F32", **GPTOSS)
    m = orcd.Model(path, device="auto", n_ctx=64)
    try:
        assert m.device == "cuda"
        ref = core.CpuEngine(path, 64, 1)
        ids = np.asarray([3, 5, 7, 11], np.int32)
        assert_close_rows(m._engine.forward(0, ids, 0)[None], ref.forward(0, ids, 0)[None], "gpt-oss under auto")
        ref.close()
    finally:
        m.close()
    r = BatchRunner(path, device="auto", n_ctx=64, n_slots=2)
    assert r.device == "cuda"
    r.close()


@pytest.mark.parametrize("fused_decoder", [False, True])
def test_real_smollm2_greedy_equals_cpu(smollm2_path, fused_decoder):
    cpu = core.CpuEngine(smollm2_path, 128, 1)
    gpu = cu.CudaEngine(smollm2_path, 128, 1)
    gpu.set_options(fast_decode=fused_decoder)
    assert gpu.paths()["fast_decode"] == fused_decoder, gpu.paths()
    ids = np.array([504, 3575, 282, 4649, 314], np.int32)  # "The capital of France is"
    t_cpu = int(np.argmax(cpu.forward(0, ids, 0)))
    t_gpu = int(np.argmax(gpu.forward(0, ids, 0)))
    assert t_cpu == t_gpu
    assert list(gpu.decode_greedy(0, t_gpu, len(ids), 16)) == list(cpu.decode_greedy(0, t_cpu, len(ids), 16))
