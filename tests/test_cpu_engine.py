"""The C++ CPU engine against the independent NumPy reference (tests/reference_qwen2.py):
hidden state after the embedding and after every layer, and the final logits."""
import numpy as np
import pytest

import orcd
from reference_qwen2 import Qwen2Reference

WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
MIN_COSINE = 0.9999


def cosine(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare_trace(engine, ref, ids, min_cos=MIN_COSINE):
    hidden, logits = engine.trace(np.asarray(ids, np.int32))
    ref_hidden, ref_logits = ref.forward(ids)
    assert len(hidden) == len(ref_hidden) == ref.n_layer + 1
    worst = 1.0
    for i, (h, r) in enumerate(zip(hidden, ref_hidden)):
        assert h.shape == r.shape
        c = cosine(h, r)
        worst = min(worst, c)
        assert c >= min_cos, f"hidden state {i} (0 = embedding, i = after layer i-1): cosine {c:.6f}"
    assert logits.shape == ref_logits.shape
    for t in range(len(ids)):
        c = cosine(logits[t], ref_logits[t])
        assert c >= min_cos, f"logits of token {t}: cosine {c:.6f}"
        assert int(np.argmax(logits[t])) == int(np.argmax(ref_logits[t])), f"argmax of token {t}"
    return worst


@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_tiny_model_matches_reference(tiny_model, wtype):
    path = tiny_model(wtype)
    eng = orcd._orcd.CpuEngine(path, 64)
    ref = Qwen2Reference(path)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, eng.info()["n_vocab"], size=9).tolist()
    compare_trace(eng, ref, ids)


def test_trace_last_row_logits_only(tiny_model):
    """trace(ids, all_logits=False) (what `orcd verify` uses for long prompts): the same hidden
    states, and the last row's logits only, matching the reference's last row."""
    path = tiny_model("Q8_0")
    eng = orcd._orcd.CpuEngine(path, 64)
    ids = [3, 14, 15, 92, 65, 35, 89, 7, 9, 31]
    hidden, logits = eng.trace(np.asarray(ids, np.int32), False)
    ref_hidden, ref_logits = Qwen2Reference(path).forward(ids)
    assert logits.shape == (1, ref_logits.shape[1])
    assert cosine(logits[0], ref_logits[-1]) >= MIN_COSINE
    assert int(np.argmax(logits[0])) == int(np.argmax(ref_logits[-1]))
    assert len(hidden) == len(ref_hidden)
    for h, r in zip(hidden, ref_hidden):
        assert h.shape == r.shape and cosine(h, r) >= MIN_COSINE


def test_tied_output_falls_back_to_token_embd(tiny_model):
    path = tiny_model("Q8_0", tied=True)
    with orcd.GGUFFile(path) as f:
        assert "output.weight" not in [t.name for t in f.tensors]
    eng = orcd._orcd.CpuEngine(path, 32)
    assert eng.info()["tied_output"] is True
    compare_trace(eng, Qwen2Reference(path), [1, 5, 9, 3, 7])


def test_incremental_decode_equals_full_prompt(tiny_model):
    """KV cache: feeding tokens one at a time gives the logits of the whole-prompt pass."""
    path = tiny_model("Q4_K")
    eng = orcd._orcd.CpuEngine(path, 32)
    ids = np.array([3, 14, 15, 92, 65, 35, 89], np.int32)
    full = eng.forward(0, ids, 0, True)
    step = [eng.forward(0, ids[i:i + 1], i) for i in range(len(ids))]
    for i in range(len(ids)):
        assert cosine(full[i], step[i]) > 0.99999
        assert np.allclose(full[i], step[i], atol=1e-3 * np.abs(full[i]).max())
    # split prompt: 4 tokens, then 3 at pos 4
    eng.forward(0, ids[:4], 0)  # fills positions 0..3 of the cache
    b = eng.forward(0, ids[4:], 4, True)
    assert np.allclose(b[-1], full[-1], atol=1e-3 * np.abs(full[-1]).max())


def test_decode_batch_matches_single_slots(tiny_model):
    path = tiny_model("Q8_0")
    eng = orcd._orcd.CpuEngine(path, 32, n_slots=2)
    p0 = np.array([5, 6, 7, 8], np.int32)
    p1 = np.array([40, 41], np.int32)
    eng.forward(0, p0, 0)
    eng.forward(1, p1, 0)
    both = eng.decode_batch(np.array([0, 1], np.int32), np.array([9, 42], np.int32), np.array([4, 2], np.int32))
    single = orcd._orcd.CpuEngine(path, 32)
    want0 = single.forward(0, np.append(p0, 9).astype(np.int32), 0)
    want1 = single.forward(0, np.append(p1, 42).astype(np.int32), 0)
    assert np.allclose(both[0], want0, atol=1e-4 * np.abs(want0).max())
    assert np.allclose(both[1], want1, atol=1e-4 * np.abs(want1).max())


def test_engine_errors_name_the_problem(tiny_model, tmp_path):
    path = tiny_model("F32")
    eng = orcd._orcd.CpuEngine(path, 8)
    n_vocab = eng.info()["n_vocab"]
    with pytest.raises(ValueError, match="context full"):
        eng.forward(0, np.arange(9, dtype=np.int32), 0)
    with pytest.raises(ValueError, match=f"token id {n_vocab} out of range"):
        eng.forward(0, np.array([n_vocab], np.int32), 0)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        eng.forward(3, np.array([1], np.int32), 0)
    # a model missing a tensor: named
    import gguf
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "qwen2")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            vals = [f.contents(i) for i in range(len(f.data))]
            w.add_key_value(f.name, vals, f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        if t.name != "blk.1.attn_k.bias":
            w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="missing tensor 'blk.1.attn_k.bias'"):
        orcd._orcd.CpuEngine(str(tmp_path / "broken.gguf"), 8)


def test_unsupported_architecture(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="unsupported architecture 'mamba'"):
        orcd._orcd.CpuEngine(str(tmp_path / "mamba.gguf"), 8)


# ------------------------------------------------------------------ real model
REAL_PROMPTS = [
    [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198],
    [750, 15801, 1445, 982],
]


@pytest.mark.parametrize("ids", REAL_PROMPTS, ids=["chat-2+2", "def-fib"])
def test_real_model_matches_reference(real_model_path, real_reference, ids):
    eng = orcd._orcd.CpuEngine(real_model_path, 64)
    worst = compare_trace(eng, real_reference, ids)
    print(f"worst per-layer cosine vs NumPy reference: {worst:.7f}")


def test_f16_copy_gives_same_greedy_tokens(real_model_path, real_model_f16_path):
    ids = np.array(REAL_PROMPTS[0], np.int32)
    outs = []
    for path in (real_model_path, real_model_f16_path):
        eng = orcd._orcd.CpuEngine(path, 64)
        logits = eng.forward(0, ids, 0)
        toks = []
        for i in range(8):
            t = int(np.argmax(logits))
            toks.append(t)
            logits = eng.forward(0, np.array([t], np.int32), len(ids) + i)
        outs.append(toks)
    assert outs[0] == outs[1]


def test_decode_greedy_equals_forward_argmax(tiny_model):
    path = tiny_model("Q5_0")
    eng = orcd._orcd.CpuEngine(path, 32)
    prompt = np.array([4, 8, 15, 16], np.int32)
    first = int(np.argmax(eng.forward(0, prompt, 0)))
    got = eng.decode_greedy(0, first, len(prompt), 6)
    ref = orcd._orcd.CpuEngine(path, 32)
    ids = list(prompt) + [first]
    want = []
    for _ in range(6):
        t = int(np.argmax(ref.forward(0, np.array(ids, np.int32), 0)))
        want.append(t)
        ids.append(t)
    assert got.tolist() == want


def test_engine_calls_from_threads_are_serialised(tiny_model):
    """Python threads sharing one engine: calls run one at a time, results as if sequential."""
    import threading
    path = tiny_model("Q8_0")
    eng = orcd._orcd.CpuEngine(path, 64, n_slots=2)
    ids = [np.array([1, 2, 3, 4, 5], np.int32), np.array([9, 8, 7], np.int32)]
    want = [orcd._orcd.CpuEngine(path, 64).forward(0, p, 0) for p in ids]
    errors, results = [], {}

    def work(slot):
        try:
            for _ in range(20):
                results[slot] = eng.forward(slot, ids[slot], 0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for s in (0, 1):
        assert np.allclose(results[s], want[s], atol=1e-4 * np.abs(want[s]).max())


# ------------------------------------------------------------------ argument errors, every backend

def _engines(path, n_ctx, n_slots):
    """(name, engine) for the CPU engine and, where a GPU is usable, the CUDA engine."""
    yield "cpu", orcd._orcd.CpuEngine(path, n_ctx, n_slots)
    try:
        from orcd import _orcd_cuda as cu
    except ImportError:
        return
    if cu.cuda_status() == "":
        yield "cuda", cu.CudaEngine(path, n_ctx, n_slots)


def test_argument_errors_read_the_same_on_every_engine(tiny_model):
    """Bad slot, position, token id or a repeated slot: one exact message (engine.h's
    checks), whichever engine gets the call; the CUDA engine is checked where a GPU is usable."""
    path = tiny_model("Q8_0")
    ids = lambda *v: np.array(v, np.int32)  # noqa: E731
    seen = {}
    for name, eng in _engines(path, 8, 2):
        V = eng.info()["n_vocab"]
        cases = [
            (lambda: eng.forward(2, ids(1), 0), "forward: slot 2 out of range [0, 2)"),
            (lambda: eng.forward(-1, ids(1), 0), "forward: slot -1 out of range [0, 2)"),
            (lambda: eng.forward(0, ids(), 0), "forward: no tokens"),
            (lambda: eng.forward(0, ids(*range(6)), 3),
             "forward: context full: positions 3..8 do not fit in n_ctx = 8"),
            (lambda: eng.forward(0, ids(1), 8), "forward: context full: position 8 does not fit in n_ctx = 8"),
            (lambda: eng.forward(0, ids(1, V), 0), f"forward: token id {V} out of range [0, {V})"),
            (lambda: eng.forward(0, ids(-3), 0), f"forward: token id -3 out of range [0, {V})"),
            (lambda: eng.decode_batch(ids(1, 1), ids(1, 2), ids(0, 0)), "decode_batch: slot 1 appears twice"),
            (lambda: eng.decode_batch(ids(0, 2), ids(1, 2), ids(0, 0)), "decode_batch: slot 2 out of range [0, 2)"),
            (lambda: eng.decode_batch(ids(0, 1), ids(1, 2), ids(0, 8)),
             "decode_batch: context full: position 8 of slot 1 does not fit in n_ctx = 8"),
            (lambda: eng.decode_batch(ids(0), ids(V), ids(0)), f"decode_batch: token id {V} out of range [0, {V})"),
            (lambda: eng.decode_batch(ids(), ids(), ids()), "decode_batch: no tokens"),
            (lambda: eng.decode_batch(ids(0), ids(1, 2), ids(0)),
             "decode_batch: slots, tokens and pos must have the same length"),
            (lambda: eng.decode_greedy(2, 1, 0, 3), "decode_greedy: slot 2 out of range [0, 2)"),
            (lambda: eng.decode_greedy(0, 1, 6, 3),
             "decode_greedy: context full: positions 6..8 do not fit in n_ctx = 8"),
            (lambda: eng.decode_greedy(0, V, 0, 3), f"decode_greedy: token id {V} out of range [0, {V})"),
            (lambda: eng.decode_greedy(0, 1, 0, -1), "decode_greedy: n_steps must be >= 0 (got -1)"),
        ]
        got = []
        for call, want in cases:
            with pytest.raises(ValueError) as err:
                call()
            assert str(err.value) == want, name
            got.append(str(err.value))
        # a refused call leaves the engine usable, and a closed engine says so
        assert eng.forward(0, ids(1, 2), 0).shape == (V,)
        assert eng.decode_greedy(0, 3, 2, 0).shape == (0,)
        eng.close()
        with pytest.raises(ValueError, match="engine is closed"):
            eng.forward(0, ids(1), 0)
        seen[name] = got
    assert len(set(map(tuple, seen.values()))) == 1, seen
