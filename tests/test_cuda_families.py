"""The other families on the CUDA engine (skipped without a usable GPU).

llama (normal RoPE pairing, no biases, tied output) runs in the generic step:
per-layer hidden states and logits against the CPU engine (cosine >= 0.999, same
argmax) with the fused prompt path on and off, and decode_batch; the fused
single-sequence decoder reports itself unavailable and says why. phi3, gemma3
and gpt-oss are refused at construction with a ValueError naming the family and
the features the CUDA engine lacks. The real SmolLM2 file, when installed,
gives the CPU engine's greedy tokens.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_skip import cuda_or_skip  # noqa: E402

cu = cuda_or_skip()

from orcd import _orcd as core  # noqa: E402
from test_cuda_engine import assert_close_rows  # noqa: E402
from test_families import family_model, ids_for, smollm2_path  # noqa: E402,F401  (the fixtures)

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


@pytest.mark.parametrize("fused_prompt", [True, False])
@pytest.mark.parametrize("wtype", TYPES)
def test_llama_generic_step_matches_cpu(family_model, wtype, fused_prompt):
    path = family_model("llama", wtype, tied=wtype == "Q8_0")
    gpu = cu.CudaEngine(path, 64, 2)
    gpu.set_options(fused_prompt=fused_prompt)
    cpu = core.CpuEngine(path, 64, 2)
    ids = ids_for(cpu, 11)
    compare(gpu, cpu, ids)
    # single-token steps (the mat-vec path) and a two-slot decode batch
    ids = np.asarray(ids, np.int32)
    gpu.forward(0, ids[:6], 0)
    cpu.forward(0, ids[:6], 0)
    gpu.forward(1, ids[:4], 0)
    cpu.forward(1, ids[:4], 0)
    args = (np.array([0, 1], np.int32), np.array([7, 9], np.int32), np.array([6, 4], np.int32))
    assert_close_rows(gpu.decode_batch(*args), cpu.decode_batch(*args), "decode_batch")


def test_llama_fused_decoder_says_why_it_is_off(family_model):
    gpu = cu.CudaEngine(family_model("llama", "F16"), 32, 1)
    p = gpu.paths()
    assert not p["fast_decode_available"] and not p["fast_decode"]
    assert "qwen2 shape only" in p["note"] and "llama" in p["note"]
    cpu = core.CpuEngine(family_model("llama", "F16"), 32, 1)
    first = int(np.argmax(cpu.forward(0, np.array([3, 4, 5], np.int32), 0)))
    gpu.forward(0, np.array([3, 4, 5], np.int32), 0)
    assert list(gpu.decode_greedy(0, first, 3, 6)) == list(cpu.decode_greedy(0, first, 3, 6))


@pytest.mark.parametrize("arch,feature", [("phi3", "fused attn_qkv"), ("gemma3", "per-head Q/K norms"),
                                          ("gpt-oss", "mixture-of-experts FFN, attention sinks")])
def test_other_families_are_refused_by_name(family_model, arch, feature):
    with pytest.raises(ValueError, match=f"the CUDA engine does not run {arch} models yet .*{feature}"):
        cu.CudaEngine(family_model(arch, "F32"), 16, 1)


@pytest.mark.parametrize("arch", ["phi3", "gemma3", "gpt-oss"])
def test_auto_device_falls_back_to_the_cpu_for_a_refused_family(family_model, arch, capfd):
    """device="auto" on a GPU: a family the CUDA engine refuses runs on the CPU engine (with a
    note naming why), giving the CPU's tokens; device="cuda" still refuses."""
    import orcd
    from orcd.batch import BatchRunner
    path = family_model(arch, "F32")
    m = orcd.Model(path, device="auto", n_ctx=64)
    try:
        assert m.device == "cpu"
        assert "the CUDA engine does not run" in capfd.readouterr().err
        ref = core.CpuEngine(path, 64, 1)
        ids = np.asarray([3, 5, 7, 11], np.int32)
        np.testing.assert_array_equal(m._engine.forward(0, ids, 0), ref.forward(0, ids, 0))
        ref.close()
    finally:
        m.close()
    r = BatchRunner(path, device="auto", n_ctx=64, n_slots=2)
    assert r.device == "cpu"
    r.close()
    with pytest.raises(ValueError, match="the CUDA engine does not run"):
        orcd.Model(path, device="cuda", n_ctx=64)


def test_real_smollm2_greedy_equals_cpu(smollm2_path):
    cpu = core.CpuEngine(smollm2_path, 128, 1)
    gpu = cu.CudaEngine(smollm2_path, 128, 1)
    ids = np.array([504, 3575, 282, 4649, 314], np.int32)  # "The capital of France is"
    t_cpu = int(np.argmax(cpu.forward(0, ids, 0)))
    t_gpu = int(np.argmax(gpu.forward(0, ids, 0)))
    assert t_cpu == t_gpu
    assert list(gpu.decode_greedy(0, t_gpu, len(ids), 16)) == list(cpu.decode_greedy(0, t_cpu, len(ids), 16))
