"""Tiny but complete GGUF files for tests, written with gguf.GGUFWriter.

    write_tiny_qwen2(path, weight_type="Q8_0")      # random weights, real metadata,
                                                    # a small valid byte-level BPE vocab
    write_tiny_family(path, "gemma3", "Q4_K")       # the same for llama, phi3, gemma3, gpt-oss:
                                                    # each family's tensors and keys as
                                                    # llama.cpp's converter names them
    write_f16_copy(src, dst)                        # every quantized tensor -> F16

Weights are random (seeded) and scaled so activations stay O(1). Types that
gguf.quants.quantize cannot produce (the K-quants) are written as random valid
blocks: random quant bytes with fp16 super-block scales chosen so each block has
mean ~0 and the wanted standard deviation.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants

__all__ = [
    "WEIGHT_TYPES", "K_QUANTS", "CHATML_TEMPLATE", "CONTROL_TOKENS",
    "write_tiny_qwen2", "write_f16_copy", "tiny_vocab", "bytes_to_unicode",
    "default_dims", "random_quant_blocks", "FAMILIES", "write_tiny_family",
]

WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Byte offsets of the fp16 super-block scale(s) in each K-quant block (ggml's
# block_q*_K layouts): (offset of d, offset of dmin or None).
_K_SCALE_OFFSETS = {
    "Q2_K": (80, 82),    # scales[16] qs[64] d dmin
    "Q3_K": (108, None),  # hmask[32] qs[64] scales[12] d
    "Q4_K": (0, 2),      # d dmin scales[12] qs[128]
    "Q5_K": (0, 2),      # d dmin scales[12] qh[32] qs[128]
    "Q6_K": (208, None),  # ql[128] qh[64] scales[16] d
}

# llama.cpp's general.file_type values (LlamaFileType) for an all-one-type model.
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8,
              "Q5_1": 9, "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17,
              "Q6_K": 18, "BF16": 32, "MXFP4": 38}

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Plain ChatML, as Qwen2.5 renders it when there are no tools (without the
# default system prompt).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


# ------------------------------------------------------------------ tokenizer

def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable unicode character table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# ASCII version of the Qwen2 pre-tokenizer split (exact for ASCII text).
_PRETOK = re.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = """\
Hello world! Hello there, how are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. The dog is lazy and the fox is quick.
user
assistant
system
user
assistant
system
user: Hello! assistant: Hi, how can I help you? system: You are helpful.
You are a helpful assistant. What is the capital of France? The capital of France is Paris.
Write a function in Python that returns the sum of two numbers.
def add(a, b):
    return a + b
def main():
    print("hello world")
    for i in range(10):
        print(i)
if __name__ == "__main__":
    main()
The answer is 4. What is 2+2? It is 4. Once upon a time there was a little model.
It lived in a tiny file and it generated text one token at a time, in order.
the the the and and and of of of to to in in is is it it that that this this
"""


def _train_bpe(text: str, n_merges: int) -> List[Tuple[str, str]]:
    """Deterministic byte-level BPE training on text (ties broken by the pair)."""
    b2u = bytes_to_unicode()
    words = Counter("".join(b2u[b] for b in w.encode("utf-8")) for w in _PRETOK.findall(text))
    seqs = {w: tuple(w) for w in words}
    merges: List[Tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        a, b = best
        for w in words:
            s = seqs[w]
            if len(s) < 2:
                continue
            out = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return merges


def tiny_vocab(n_merges: int = 200) -> Tuple[List[str], List[int], List[str]]:
    """(tokens, token_types, merges): 256 byte tokens, merged tokens, then the
    control tokens <|endoftext|>, <|im_start|>, <|im_end|>."""
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in sorted(b2u)]  # token id b <-> byte b
    seen = set(tokens)
    merges = _train_bpe(_CORPUS, n_merges)
    for a, b in merges:
        t = a + b
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    types = [TOKEN_NORMAL] * len(tokens)
    for t in CONTROL_TOKENS:
        tokens.append(t)
        types.append(TOKEN_CONTROL)
    return tokens, types, [f"{a} {b}" for a, b in merges]


# ------------------------------------------------------------------ weights

def _qtype(name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name]
    except KeyError:
        raise ValueError(f"unknown weight type {name!r}; one of {WEIGHT_TYPES}") from None


def _can_quantize(qt: GGMLQuantizationType) -> bool:
    try:
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[qt][0]), dtype=np.float32), qt)
        return True
    except NotImplementedError:
        return False


def random_quant_blocks(rng: np.random.Generator, qt: GGMLQuantizationType,
                        n_rows: int, n_cols: int, std: float) -> np.ndarray:
    """Random valid blocks of a K-quant type: uint8 (n_rows, n_cols/256*block_bytes).

    The quant bytes are random; per block the fp16 d (and dmin) are set so the
    block's dequantized values have mean ~0 and standard deviation ~std. Relies
    only on dequantization being linear in (d, dmin).
    """
    name = qt.name
    bs, tsz = GGML_QUANT_SIZES[qt]
    if n_cols % bs:
        raise ValueError(f"{name}: row length {n_cols} is not a multiple of {bs}")
    od, om = _K_SCALE_OFFSETS[name]
    nb = n_rows * (n_cols // bs)
    blocks = rng.integers(0, 256, size=(nb, tsz), dtype=np.uint8)

    def with_scales(d: np.ndarray, dmin: Optional[np.ndarray]) -> np.ndarray:
        b = blocks.copy()
        b[:, od:od + 2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
        if om is not None:
            b[:, om:om + 2] = dmin.astype(np.float16).reshape(-1, 1).view(np.uint8)
        return b

    ones, zeros = np.ones(nb), np.zeros(nb)
    A = quants.dequantize(with_scales(ones, zeros if om is not None else None), qt).reshape(nb, bs)
    A = A.astype(np.float64)
    if om is not None:
        B = quants.dequantize(with_scales(zeros, ones), qt).reshape(nb, bs).astype(np.float64)
        mb = B.mean(axis=1)
        # values = d*A + dmin*B ; choose r = dmin/d so the block mean is 0
        r = np.where(np.abs(mb) > 1e-9, -A.mean(axis=1) / np.where(mb == 0, 1, mb), 0.0)
        r = np.clip(r, 0.0, 1e3)
        vals = A + r[:, None] * B
    else:
        r = None
        vals = A
    sd = vals.std(axis=1)
    sd = np.where(sd > 0, sd, 1.0)
    d = std / sd
    d16 = d.astype(np.float16)
    dmin16 = (d * r).astype(np.float16) if r is not None else None
    if not (np.all(np.isfinite(d16)) and (dmin16 is None or np.all(np.isfinite(dmin16)))):
        raise ValueError(f"{name}: non-finite block scale")
    return with_scales(d16, dmin16).reshape(n_rows, -1)


def _encode_matrix(rng: np.random.Generator, type_name: str, n_out: int, n_in: int,
                   std: float) -> Tuple[np.ndarray, Optional[GGMLQuantizationType]]:
    """(array, raw_dtype) for GGUFWriter.add_tensor of an [n_in, n_out] weight."""
    qt = _qtype(type_name)
    bs = GGML_QUANT_SIZES[qt][0]
    if n_in % bs:
        raise ValueError(f"{type_name}: ne[0]={n_in} is not a multiple of the block size {bs}")
    if qt == GGMLQuantizationType.F32:
        return (rng.standard_normal((n_out, n_in)) * std).astype(np.float32), None
    if qt == GGMLQuantizationType.F16:
        return (rng.standard_normal((n_out, n_in)) * std).astype(np.float16), None
    if _can_quantize(qt):
        w = (rng.standard_normal((n_out, n_in)) * std).astype(np.float32)
        q = quants.quantize(w, qt)
        if q.dtype != np.uint8:
            q = q.view(np.uint8)
        return np.ascontiguousarray(q.reshape(n_out, -1)), qt
    return random_quant_blocks(rng, qt, n_out, n_in, std), qt


def default_dims(weight_type: str, tensor_types: Optional[Mapping[str, str]] = None):
    """(n_embd, n_ff) that suit every type in use: (256, 512) when a K-quant is
    involved, else (64, 128)."""
    used = {weight_type} | set((tensor_types or {}).values())
    if any(t in K_QUANTS for t in used):
        return 256, 512
    return 64, 128


def write_tiny_qwen2(path, weight_type: str = "F32", tied: bool = False, seed: int = 0,
                     n_layer: int = 2, n_embd: Optional[int] = None, n_head: int = 4,
                     n_head_kv: int = 2, n_ff: Optional[int] = None,
                     n_vocab: Optional[int] = None, pad_vocab: int = 0,
                     pad_tokens: bool = True, n_ctx_train: int = 2048,
                     rope_base: float = 1e6, rms_eps: float = 1e-6,
                     n_merges: int = 200, tensor_types: Optional[Mapping[str, str]] = None,
                     chat_template: Optional[str] = CHATML_TEMPLATE,
                     bias_std: float = 0.2, name: Optional[str] = None) -> str:
    """Write a random tiny qwen2 GGUF; returns str(path).

    weight_type: type of every 2-D matrix (token_embd, output, all layer
        matrices); norms and biases are F32.
    tensor_types: per-tensor overrides, keys are a full tensor name
        ("blk.0.ffn_down.weight") or a suffix ("ffn_down.weight", "token_embd.weight").
    n_embd / n_ff: default (64, 128), or (256, 512) when a K-quant is used.
    n_vocab: rows of token_embd / output; default len(tokens) + pad_vocab.
        Rows beyond the tokenizer's tokens are listed as "[PAD<id>]" UNUSED
        tokens (like the real Qwen2.5 files) when pad_tokens, else left out of
        the token list (the list is then shorter than the embedding).
    tied: no output.weight (the lm head reuses token_embd).
    """
    tensor_types = dict(tensor_types or {})
    d_embd, d_ff = default_dims(weight_type, tensor_types)
    n_embd = d_embd if n_embd is None else int(n_embd)
    n_ff = d_ff if n_ff is None else int(n_ff)
    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    head_dim = n_embd // n_head
    if head_dim % 2:
        raise ValueError("head_dim must be even for RoPE")

    tokens, types, merges = tiny_vocab(n_merges)
    n_tok = len(tokens)
    rows = n_tok + int(pad_vocab) if n_vocab is None else int(n_vocab)
    if rows < n_tok:
        raise ValueError(f"n_vocab={rows} is smaller than the tokenizer's {n_tok} tokens")
    if pad_tokens and rows > n_tok:
        tokens = tokens + [f"[PAD{i}]" for i in range(n_tok, rows)]
        types = types + [TOKEN_UNUSED] * (rows - n_tok)
    tok_id = {t: i for i, t in enumerate(tokens)}

    rng = np.random.default_rng(seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = GGUFWriter(path, "qwen2")
    w.add_name(name or f"tiny-qwen2-{weight_type}{'-tied' if tied else ''}")
    w.add_type("model")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(rope_base))
    w.add_layer_norm_rms_eps(float(rms_eps))
    if weight_type in _FILE_TYPE:
        w.add_file_type(_FILE_TYPE[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok_id["<|im_end|>"])
    w.add_pad_token_id(tok_id["<|endoftext|>"])
    w.add_bos_token_id(tok_id["<|endoftext|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def type_for(tname: str) -> str:
        if tname in tensor_types:
            return tensor_types[tname]
        for k, v in tensor_types.items():
            if tname.endswith("." + k) or tname == k:
                return v
        return weight_type

    def mat(tname: str, n_out: int, n_in: int, std: float):
        arr, raw = _encode_matrix(rng, type_for(tname), n_out, n_in, std)
        w.add_tensor(tname, arr, raw_dtype=raw)

    def vec(tname: str, n: int, mean: float, std: float):
        w.add_tensor(tname, (mean + rng.standard_normal(n) * std).astype(np.float32))

    emb_std = 2.0 / np.sqrt(n_embd)  # logits through a (tied) lm head: std ~2
    mat("token_embd.weight", rows, n_embd, emb_std)
    for il in range(n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", n_embd, 1.0, 0.1)
        mat(p + "attn_q.weight", n_head * head_dim, n_embd, 1 / np.sqrt(n_embd))
        vec(p + "attn_q.bias", n_head * head_dim, 0.0, bias_std)
        mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd, 1 / np.sqrt(n_embd))
        vec(p + "attn_k.bias", n_head_kv * head_dim, 0.0, bias_std)
        mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd, 1 / np.sqrt(n_embd))
        vec(p + "attn_v.bias", n_head_kv * head_dim, 0.0, bias_std)
        mat(p + "attn_output.weight", n_embd, n_head * head_dim, 1 / np.sqrt(n_embd))
        vec(p + "ffn_norm.weight", n_embd, 1.0, 0.1)
        mat(p + "ffn_gate.weight", n_ff, n_embd, 1 / np.sqrt(n_embd))
        mat(p + "ffn_up.weight", n_ff, n_embd, 1 / np.sqrt(n_embd))
        mat(p + "ffn_down.weight", n_embd, n_ff, 1 / np.sqrt(n_ff))
    vec("output_norm.weight", n_embd, 1.0, 0.1)
    if not tied:
        mat("output.weight", rows, n_embd, 2.0 / np.sqrt(n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------ F16 copy

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def _field_value(field):
    """(value, vtype, sub_type) of a reader field, ready for add_key_value."""
    vtype = field.types[0]
    if vtype != GGUFValueType.ARRAY:
        return field.contents(), vtype, None
    sub = field.types[1] if len(field.types) > 1 else None
    return field.contents(), vtype, sub


def write_f16_copy(src_path, dst_path) -> str:
    """Copy a GGUF, dequantizing every quantized tensor (anything other than F32
    and F16) to F16; F32 and F16 tensors are copied as they are, all metadata
    keys are copied (general.file_type is set to 1 when something was converted).
    Writes a temporary file next to dst_path, then renames it. Returns str(dst_path)."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    r = GGUFReader(src_path)
    arch = r.fields["general.architecture"].contents()
    tmp = f"{dst_path}.{os.getpid()}.tmp"
    try:
        _write_f16(r, arch, tmp)
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst_path


def _write_f16(r: GGUFReader, arch: str, tmp: str) -> None:
    w = GGUFWriter(tmp, arch)
    converted = any(t.tensor_type not in _FLOAT_TYPES for t in r.tensors)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.alignment":
            w.data_alignment = int(field.contents())
        val, vtype, sub = _field_value(field)
        if vtype == GGUFValueType.ARRAY and len(val) == 0:
            continue  # the writer cannot write an empty array
        if key == "general.file_type" and converted:
            val = 1
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        ne = [int(n) for n in t.shape]
        shape = tuple(reversed(ne))
        if t.tensor_type == GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        elif t.tensor_type == GGMLQuantizationType.F16:
            arr = np.asarray(t.data).view(np.float16).reshape(shape)
        else:
            qt = GGMLQuantizationType(int(t.tensor_type))
            data = t.data.reshape(ne[-1] if len(ne) > 1 else 1, -1)
            arr = np.empty((data.shape[0], ne[0]), dtype=np.float16)
            step = max(1, (1 << 24) // max(ne[0], 1))  # bound float32 scratch memory
            for r0 in range(0, data.shape[0], step):
                arr[r0:r0 + step] = quants.dequantize(data[r0:r0 + step], qt).reshape(-1, ne[0])
            arr = arr.reshape(shape)
        w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------ edited copies and fuzz seeds

def _raw_tensor(t) -> Tuple[np.ndarray, Optional[GGMLQuantizationType]]:
    """(array, raw_dtype) that GGUFWriter.add_tensor writes back byte for byte."""
    ne = [int(n) for n in t.shape]
    shape = tuple(reversed(ne))
    if t.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape), None
    if t.tensor_type == GGMLQuantizationType.F16:
        return np.asarray(t.data).view(np.float16).reshape(shape), None
    qt = GGMLQuantizationType(int(t.tensor_type))
    rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
    return np.ascontiguousarray(np.asarray(t.data).view(np.uint8).reshape(rows, -1)), qt


def copy_with_metadata(src_path, dst_path, set_values: Optional[Mapping] = None,
                       drop: Tuple[str, ...] = ()) -> str:
    """Copy a GGUF with metadata edits; tensors are copied byte for byte.

    set_values: key -> value (keeps the key's type when it exists) or
        key -> (value, GGUFValueType[, sub_type]) for a new key or a new type.
    drop: keys to leave out. Returns str(dst_path)."""
    src_path, dst_path = os.fspath(src_path), os.fspath(dst_path)
    set_values = dict(set_values or {})
    r = GGUFReader(src_path)
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(dst_path, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        val, vtype, sub = _field_value(field)
        if key in set_values:
            new = set_values.pop(key)
            if isinstance(new, tuple):
                val, vtype, sub = (tuple(new) + (None,))[:3]
            else:
                val = new
        if vtype == GGUFValueType.ARRAY and len(val) == 0:
            continue  # the writer cannot write an empty array
        w.add_key_value(key, val, vtype, sub_type=sub)
    for key, new in set_values.items():
        if not isinstance(new, tuple):
            raise ValueError(f"new key {key!r} needs (value, GGUFValueType[, sub_type])")
        val, vtype, sub = (tuple(new) + (None,))[:3]
        w.add_key_value(key, val, vtype, sub_type=sub)
    for t in r.tensors:
        arr, raw = _raw_tensor(t)
        w.add_tensor(t.name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst_path


def write_micro_qwen2(path, weight_type: str = "F32", tied: bool = False, seed: int = 0,
                      n_layer: int = 1, n_embd: int = 8, n_head: int = 2, n_head_kv: int = 1,
                      n_ff: int = 16, n_vocab: int = 16) -> str:
    """A complete but minimal qwen2 GGUF (a few KB) for fuzz seeds: n_vocab
    single-character tokens, no merges, all hyperparameter keys. n_embd must
    be a multiple of weight_type's block size."""
    rng = np.random.default_rng(seed)
    path = os.fspath(path)
    head_dim = n_embd // n_head
    w = GGUFWriter(path, "qwen2")
    w.add_name(f"micro-qwen2-{weight_type}")
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(n_vocab)])
    w.add_token_types([TOKEN_NORMAL] * n_vocab)
    w.add_eos_token_id(n_vocab - 1)

    def mat(name, n_out, n_in):
        arr, raw = _encode_matrix(rng, weight_type, n_out, n_in, 1 / np.sqrt(n_in))
        w.add_tensor(name, arr, raw_dtype=raw)

    def vec(name, n):
        w.add_tensor(name, (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32))

    mat("token_embd.weight", n_vocab, n_embd)
    for il in range(n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * head_dim, n_embd)
        vec(p + "attn_q.bias", n_head * head_dim)
        mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        vec(p + "attn_k.bias", n_head_kv * head_dim)
        mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        vec(p + "attn_v.bias", n_head_kv * head_dim)
        mat(p + "attn_output.weight", n_embd, n_head * head_dim)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd)
        mat(p + "ffn_up.weight", n_ff, n_embd)
        mat(p + "ffn_down.weight", n_embd, n_ff)
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_all_types(path, seed: int = 0) -> str:
    """One small tensor of every type in WEIGHT_TYPES (two rows of one block
    each, named after the type) and a few metadata values of every kind,
    nested arrays included: a fuzz seed for the reader and every dequantizer."""
    rng = np.random.default_rng(seed)
    path = os.fspath(path)
    w = GGUFWriter(path, "none")
    w.add_uint8("k.u8", 7)
    w.add_int16("k.i16", -3)
    w.add_float64("k.f64", 0.5)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo")
    w.add_array("k.arr_f32", [1.0, 2.0])
    w.add_array("k.arr_str", ["a", "bc"])
    w.add_array("k.nested", [[1, 2], ["x"]])
    for name in WEIGHT_TYPES:
        bs = GGML_QUANT_SIZES[_qtype(name)][0]
        arr, raw = _encode_matrix(rng, name, 2, bs, 1.0)
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------ other families

FAMILIES = ("llama", "phi3", "gemma3", "gpt-oss")


def write_tiny_family(path, arch: str, weight_type: str = "F32", tied: bool = False, seed: int = 0,
                      n_layer: int = 2, n_embd: Optional[int] = None, n_head: int = 4,
                      n_head_kv: int = 2, n_ff: Optional[int] = None, head_dim: Optional[int] = None,
                      rope_base: float = 1e4, rope_base_swa: Optional[float] = None,
                      rms_eps: float = 1e-6, sliding_window: int = 0,
                      window_pattern: Optional[int] = None, logit_softcap: float = 0.0,
                      query_pre_attn_scalar: Optional[float] = None,
                      tensor_types: Optional[Mapping[str, str]] = None,
                      extra_tensors: Optional[Mapping[str, np.ndarray]] = None,
                      extra_keys: Optional[Mapping] = None,
                      chat_template: Optional[str] = CHATML_TEMPLATE,
                      n_expert: int = 4, n_expert_used: int = 2,
                      rope_scaling: Optional[Mapping] = None,
                      gate_std: float = 3.0, drop_tensors: Tuple[str, ...] = ()) -> str:
    """Write a random tiny llama / phi3 / gemma3 / gpt-oss GGUF; returns str(path).

    llama: attn_q/k/v without biases. phi3: attn_qkv (rows q | k | v) and ffn_up
    holding gate | up (2*n_ff rows), no ffn_gate. gemma3: attn_q_norm / attn_k_norm
    ([head_dim]), post_attention_norm and post_ffw_norm; norm weights are written as
    llama.cpp's converter writes them (1 + the HF weight), so they are drawn around 1;
    head_dim may differ from n_embd / n_head (attention.key_length); sliding_window and
    window_pattern (attention.sliding_window_pattern, written only when given) place
    the local layers. sliding_window for phi3 applies to every layer.
    gpt-oss: Q/K/V and output biases, attn_sinks ([n_head], nonzero), post_attention_norm
    (the pre-FFN norm), a router ffn_gate_inp (F32, with bias) and n_expert experts of n_ff
    (expert_feed_forward_length) as 3-D ffn_{gate,up,down}_exps in weight_type with F32 biases;
    sliding_window (4 when 0; pattern 2 unless window_pattern); rope_scaling: the
    rope.scaling.* keys (default yarn, factor 32, original_context_length 64, which bites at
    a few positions of a head_dim-16 model; {} writes none). gate_std: the gate/up weights'
    std times sqrt(n_embd) (3: some activations pass swiglu_oai's limit 7). drop_tensors:
    names left out (for refusal tests).
    """
    if arch not in FAMILIES:
        raise ValueError(f"arch must be one of {FAMILIES}, not {arch!r}")
    tensor_types = dict(tensor_types or {})
    d_embd, d_ff = default_dims(weight_type, tensor_types)
    n_embd = d_embd if n_embd is None else int(n_embd)
    n_ff = d_ff if n_ff is None else int(n_ff)
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        head_dim = n_embd // n_head
    elif arch not in ("gemma3", "gpt-oss") and head_dim * n_head != n_embd:
        raise ValueError("only gemma3 and gpt-oss have a head_dim apart from n_embd / n_head")
    gptoss = arch == "gpt-oss"
    if gptoss and not sliding_window:
        sliding_window = 4  # llama.cpp requires the key for gpt-oss; 4 bites in a 12-token prompt
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim

    tokens, types, merges = tiny_vocab()
    tok_id = {t: i for i, t in enumerate(tokens)}
    rows = len(tokens)
    rng = np.random.default_rng(seed)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    w = GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}-{weight_type}{'-tied' if tied else ''}")
    w.add_type("model")
    w.add_block_count(n_layer)
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(rope_base))
    w.add_layer_norm_rms_eps(float(rms_eps))
    w.add_rope_dimension_count(head_dim)
    if arch in ("gemma3", "gpt-oss"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if gptoss:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        w.add_expert_feed_forward_length(n_ff)
        rs = {"type": "yarn", "factor": 32.0, "original_context_length": 64} if rope_scaling is None \
            else dict(rope_scaling)
        for k, v in rs.items():
            key = f"{arch}.rope.scaling.{k}"
            if isinstance(v, str):
                w.add_string(key, v)
            elif isinstance(v, int):
                w.add_uint32(key, v)
            else:
                w.add_float32(key, float(v))
    if sliding_window:
        w.add_sliding_window(int(sliding_window))
    if window_pattern is not None:
        w.add_sliding_window_pattern(window_pattern if isinstance(window_pattern, int)
                                     else [bool(b) for b in window_pattern])
    if rope_base_swa is not None:
        w.add_float32(f"{arch}.rope.freq_base_swa", float(rope_base_swa))
    if logit_softcap:
        w.add_float32(f"{arch}.final_logit_softcapping", float(logit_softcap))
    if query_pre_attn_scalar is not None:
        w.add_float32(f"{arch}.attention.query_pre_attn_scalar", float(query_pre_attn_scalar))
    for k, v in (extra_keys or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, float(v))
    if weight_type in _FILE_TYPE:
        w.add_file_type(_FILE_TYPE[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre({"llama": "smollm", "gpt-oss": "gpt-4o"}.get(arch, "gpt2"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tok_id["<|im_end|>"])
    w.add_bos_token_id(tok_id["<|endoftext|>"])
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def type_for(tname: str) -> str:
        if tname in tensor_types:
            return tensor_types[tname]
        for k, v in tensor_types.items():
            if tname.endswith("." + k) or tname == k:
                return v
        return weight_type

    def mat(tname: str, n_out: int, n_in: int, std: float, wtype: Optional[str] = None):
        if tname in drop_tensors:
            return
        arr, raw = _encode_matrix(rng, wtype or type_for(tname), n_out, n_in, std)
        w.add_tensor(tname, arr, raw_dtype=raw)

    def vec(tname: str, n: int, mean: float, std: float):
        if tname in drop_tensors:
            return
        w.add_tensor(tname, (mean + rng.standard_normal(n) * std).astype(np.float32))

    def experts(tname: str, n_out: int, n_in: int, std: float):
        """One 3-D [n_in, n_out, n_expert] tensor: the experts' matrices stacked."""
        parts = [_encode_matrix(rng, type_for(tname), n_out, n_in, std) for _ in range(n_expert)]
        w.add_tensor(tname, np.stack([a for a, _ in parts]), raw_dtype=parts[0][1])

    def bias2(tname: str, n: int, std: float):
        """An expert bias [n, n_expert]: a row per expert."""
        w.add_tensor(tname, (rng.standard_normal((n_expert, n)) * std).astype(np.float32))

    emb_std = 2.0 / np.sqrt(n_embd)
    if arch == "gemma3":
        emb_std /= np.sqrt(n_embd)  # the engine multiplies the rows by sqrt(n_embd)
    mat("token_embd.weight", rows, n_embd, emb_std)
    for il in range(n_layer if gptoss else 0):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", n_embd, 1.0, 0.1)
        for nm, n_out in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
            mat(p + nm + ".weight", n_out, n_embd, 1 / np.sqrt(n_embd))
            vec(p + nm + ".bias", n_out, 0.0, 0.2)
        mat(p + "attn_output.weight", n_embd, q_dim, 1 / np.sqrt(q_dim))
        vec(p + "attn_output.bias", n_embd, 0.0, 0.2)
        vec(p + "attn_sinks.weight", n_head, 0.0, 1.0)
        vec(p + "post_attention_norm.weight", n_embd, 1.0, 0.1)
        mat(p + "ffn_gate_inp.weight", n_expert, n_embd, 2 / np.sqrt(n_embd), wtype="F32")
        vec(p + "ffn_gate_inp.bias", n_expert, 0.0, 0.5)
        for nm in ("ffn_gate_exps", "ffn_up_exps"):
            experts(p + nm + ".weight", n_ff, n_embd, gate_std / np.sqrt(n_embd))
            bias2(p + nm + ".bias", n_ff, 0.2)
        experts(p + "ffn_down_exps.weight", n_embd, n_ff, 0.5 / np.sqrt(n_ff))
        bias2(p + "ffn_down_exps.bias", n_embd, 0.2)
    for il in range(0 if gptoss else n_layer):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", n_embd, 1.0, 0.1)
        if arch == "phi3":
            mat(p + "attn_qkv.weight", q_dim + 2 * kv_dim, n_embd, 1 / np.sqrt(n_embd))
        else:
            mat(p + "attn_q.weight", q_dim, n_embd, 1 / np.sqrt(n_embd))
            mat(p + "attn_k.weight", kv_dim, n_embd, 1 / np.sqrt(n_embd))
            mat(p + "attn_v.weight", kv_dim, n_embd, 1 / np.sqrt(n_embd))
        if arch == "gemma3":
            vec(p + "attn_q_norm.weight", head_dim, 1.0, 0.1)
            vec(p + "attn_k_norm.weight", head_dim, 1.0, 0.1)
        mat(p + "attn_output.weight", n_embd, q_dim, 1 / np.sqrt(q_dim))
        if arch == "gemma3":
            vec(p + "post_attention_norm.weight", n_embd, 1.0, 0.1)
        vec(p + "ffn_norm.weight", n_embd, 1.0, 0.1)
        if arch == "phi3":
            mat(p + "ffn_up.weight", 2 * n_ff, n_embd, 1 / np.sqrt(n_embd))
        else:
            mat(p + "ffn_gate.weight", n_ff, n_embd, 1 / np.sqrt(n_embd))
            mat(p + "ffn_up.weight", n_ff, n_embd, 1 / np.sqrt(n_embd))
        mat(p + "ffn_down.weight", n_embd, n_ff, 1 / np.sqrt(n_ff))
        if arch == "gemma3":
            vec(p + "post_ffw_norm.weight", n_embd, 1.0, 0.1)
    vec("output_norm.weight", n_embd, 1.0, 0.1)
    if not tied:
        mat("output.weight", rows, n_embd, 2.0 / np.sqrt(n_embd))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(arr, np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
