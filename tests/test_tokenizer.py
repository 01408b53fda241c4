"""orcd.tokenizer on the real model's tokenizer (Qwen2.5) and on small hand-built ones."""
from __future__ import annotations

import random

import numpy as np
import pytest

from orcd.tokenizer import StreamDecoder, Tokenizer

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


@pytest.fixture(scope="module")
def vocab_list(md):
    """The file's token strings, straight from the metadata (not from Tokenizer)."""
    return list(md["tokenizer.ggml.tokens"])


# ------------------------------------------------------------ basics

def test_sizes_and_eos(tok, md):
    assert tok.n_vocab == 151936 == len(md["tokenizer.ggml.tokens"])
    assert tok.eos_id == 151645
    assert set(tok.eos_ids) == {IM_END, ENDOFTEXT}
    assert tok.bos_id == ENDOFTEXT and tok.add_bos is False


def test_control_token_is_one_token_only_with_special(tok, vocab_list):
    assert tok.encode("<|im_start|>", special=True) == [IM_START]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", special=True)[0] == IM_START
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", special=True)[-1] == IM_END
    plain = tok.encode("<|im_start|>", special=False)
    assert len(plain) > 1
    assert not set(plain) & tok.special_ids
    assert "".join(vocab_list[i] for i in plain) == "<|im_start|>"
    assert tok.decode(plain) == "<|im_start|>"
    # The default is plain text.
    assert tok.encode("<|im_end|>") == tok.encode("<|im_end|>", special=False)
    # User-defined tokens (<tool_call>, type 4) are special too.
    assert tok.encode("<tool_call>", special=True) == [151657]
    assert len(tok.encode("<tool_call>")) > 1
    # Special parsing can be switched back and forth (shared HF switch).
    for _ in range(3):
        assert tok.encode("a<|im_end|>", special=True)[-1] == IM_END
        assert IM_END not in tok.encode("a<|im_end|>", special=False)


def test_known_tokenizations(tok, vocab_list):
    ids = tok.encode("Hello world")
    assert [vocab_list[i] for i in ids] == ["Hello", "Ġworld"]
    # Qwen2 splits digits one by one.
    ids = tok.encode("12345")
    assert [vocab_list[i] for i in ids] == ["1", "2", "3", "4", "5"]
    ids = tok.encode("x = 1000000")
    assert [vocab_list[i] for i in ids][-7:] == ["1", "0", "0", "0", "0", "0", "0"]
    # Newlines: "\n" is Ċ, "\r\n" is čĊ.
    assert [vocab_list[i] for i in tok.encode("\n")] == ["Ċ"]
    assert "".join(vocab_list[i] for i in tok.encode("a\r\nb")) == "ačĊb"
    # Contractions are their own pieces, case-insensitively.
    assert [vocab_list[i] for i in tok.encode("I'M")][-1] == "'M"
    assert [vocab_list[i] for i in tok.encode("don't")][-1] == "'t"
    assert tok.encode("") == []


def test_token_to_bytes(tok, vocab_list):
    i = vocab_list.index("Ġworld")
    assert tok.token_to_bytes(i) == b" world"
    assert tok.token_to_bytes(vocab_list.index("Ċ")) == b"\n"
    assert tok.token_to_bytes(IM_START) == b"<|im_start|>"
    # Every single byte has a token standing for exactly that byte.
    for b in (0, 10, 32, 65, 127, 128, 0xC3, 0xF0, 0xFF):
        ids = [k for k, s in enumerate(vocab_list[:300]) if tok.token_to_bytes(k) == bytes([b])]
        assert len(ids) == 1, b
    # A token for part of a UTF-8 sequence: "é" is C3 A9; some token is the lone C3 byte.
    assert any(tok.token_to_bytes(t) == b"\xc3" for t in range(300))
    with pytest.raises(ValueError, match="out of range"):
        tok.token_to_bytes(tok.n_vocab)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_decode_skip_special(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n", special=True)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(ids, skip_special=True) == "user\nhi\n"
    # A cut multi-byte character decodes to U+FFFD.
    lead = next(t for t in range(300) if tok.token_to_bytes(t) == b"\xc3")
    assert tok.decode([lead]) == "\ufffd"
    assert tok.decode(tok.encode("x") + [lead]) == "x\ufffd"


# ------------------------------------------------------------ round trips

CORPUS = [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nCRLF\rCR",
    "def f(x):\n    return x ** 2  # square\n\n\n", "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "中文分词测试，标点。",
    "日本語のテキスト", "한국어 텍스트", "العربية", "עברית", "Ελληνικά", "Русский текст",
    "combining: e\u0301 a\u0308 n\u0303\u0301", "zero width: a\u200bb\u200dc\ufeff", "nul\x00byte \x01\x7f",
    "\u00a0nbsp\u2003em\u3000ideographic", "<|im_start|> not special <|endoftext|>", "'s 're 'VE 'Ll",
    "1234567890 3.14159 -42 1e10", "a" * 300, " " * 50, "\n" * 20, "\t \n \r\n \t",
    "mixed123abc456def", "math: ∑ ∫ √ ∞ ≠ ≤", "\U0010fffd \U000e0001 \ufffd", "ǅ ǈ ǋ ᾈ",
    "https://example.com/path?q=1&r=2#frag", '{"json": [1, 2, {"k": null}]}',
]


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(chr(rng.randrange(0x20, 0x7F)))
        elif r < 0.4:
            out.append(rng.choice(" \n\t\r  "))
        else:
            while True:
                c = rng.randrange(0, 0x110000)
                if not 0xD800 <= c <= 0xDFFF:
                    break
            out.append(chr(c))
    return "".join(out)


def test_round_trip_corpus(tok):
    for s in CORPUS:
        ids = tok.encode(s)
        assert tok.decode(ids) == s, s
        assert b"".join(tok.token_to_bytes(i) for i in ids) == s.encode("utf-8")


def test_round_trip_random_unicode(tok):
    rng = random.Random(1234)
    for k in range(400):
        s = random_text(rng, rng.randrange(1, 60))
        ids = tok.encode(s)
        assert tok.decode(ids) == s, repr(s)


def test_lone_surrogate_rejected(tok):
    with pytest.raises(ValueError):
        tok.encode("a\ud800b")


# ------------------------------------------------------------ independent reference

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _reference_encoder(md):
    """Plain-Python byte-level BPE (GPT-2's algorithm) over the GGUF vocab and
    merges, with the Qwen2 split regex run by the `regex` module."""
    regex = pytest.importorskip("regex")
    from tiny_models import bytes_to_unicode  # GPT-2's byte table, test-side (not orcd's)

    byte_char = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(md["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(md["tokenizer.ggml.merges"])}
    split = regex.compile(QWEN2_SPLIT)
    cache = {}

    def bpe(word):
        if word in cache:
            return cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 60), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, _ = min(pairs)
            if r == 1 << 60:
                break
            a, b = next((parts[i], parts[i + 1]) for rr, i in pairs if rr == r)
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            parts = out
        cache[word] = parts
        return parts

    def encode(text):
        ids = []
        for piece in split.findall(text):
            word = "".join(byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(vocab[p] for p in bpe(word))
        return ids

    return encode


def test_matches_independent_reference(tok, md):
    ref = _reference_encoder(md)
    rng = random.Random(7)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                " \n\t\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`" "éèàüöäßçñ" "中文字符测试" "ひらがなカタカナ"
                "Ελληνικάабвгд" "😀😂👍🌍🚀" "\u0301\u200d\u00a0")
    samples = list(CORPUS)
    words = ["the", " the", "function", " return", "    ", "\n\n", "'s", "'LL", "123", "x",
             "def", " class", "😀", "中文", " -", "...", "!!", "\r\n"]
    for _ in range(300):
        if rng.random() < 0.5:
            samples.append("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))))
        else:
            samples.append("".join(rng.choice(words) for _ in range(rng.randrange(1, 15))))
    for s in samples:
        assert tok.encode(s) == ref(s), repr(s)


# ------------------------------------------------------------ streaming

def _byte_token_ids(tok, vocab_list):
    """byte value -> id of the token that stands for exactly that byte."""
    out = {}
    for i in range(tok.n_vocab):
        b = tok.token_to_bytes(i)
        if len(b) == 1 and tok.token_type(i) == 1:
            out.setdefault(b[0], i)
        if len(out) == 256:
            break
    assert len(out) == 256
    return out


def test_stream_decoder_bytewise_emoji(tok, vocab_list):
    text = "👍🏽🇫🇷 héllo 世界 👨‍👩‍👧 ok"
    byte_id = _byte_token_ids(tok, vocab_list)
    ids = [byte_id[b] for b in text.encode("utf-8")]
    d = StreamDecoder(tok)
    pieces = [d.feed(i) for i in ids]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + d.flush() == text
    # A 4-byte character appears whole, on its last byte.
    assert pieces[:4] == ["", "", "", "👍"]
    for p in pieces:
        p.encode("utf-8")  # always valid (no lone surrogates)
    # Real tokenization of the same text streams to the same text.
    d = StreamDecoder(tok)
    assert "".join(d.feed(i) for i in tok.encode(text)) + d.flush() == text


def test_stream_decoder_flushes_incomplete_tail(tok, vocab_list):
    byte_id = _byte_token_ids(tok, vocab_list)
    d = StreamDecoder(tok)
    cut = "a🌍".encode("utf-8")[:3]  # "a" + first two bytes of the emoji
    assert "".join(d.feed(byte_id[b]) for b in cut) == "a"
    assert d.flush() == "\ufffd"
    # Reusable after flush.
    assert d.feed(byte_id[ord("z")]) == "z"
    # An invalid byte in the middle is replaced at once, not held.
    d = StreamDecoder(tok)
    assert d.feed(byte_id[0xFF]) == "\ufffd"
    assert d.feed(byte_id[ord("x")]) == "x"
    assert d.flush() == ""


def test_stream_decoder_matches_decode_on_random_ids(tok):
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(tok.n_vocab) for _ in range(rng.randrange(1, 30))]
        d = StreamDecoder(tok)
        assert "".join(d.feed(i) for i in ids) + d.flush() == tok.decode(ids)
    d = StreamDecoder(tok, skip_special=True)
    assert d.feed(IM_END) == ""


# ------------------------------------------------------------ small hand-built tokenizers

def _byte_level_md(**over):
    from orcd.tokenizer import _BYTE_TO_CHAR
    tokens = [_BYTE_TO_CHAR[b] for b in range(256)] + ["he", "ll", "hell", "hello", "<s>", "</s>"]
    types = [1] * 260 + [3, 3]
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.bos_token_id": 260,
        "tokenizer.ggml.eos_token_id": 261,
    }
    md.update(over)
    return md


def test_small_tokenizer_and_bos():
    t = Tokenizer.from_metadata(_byte_level_md())
    assert t.encode("hello") == [259]
    assert t.encode("hello", special=True) == [259]
    assert t.eos_ids == {261}
    t = Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.add_bos_token": True}))
    assert t.encode("hello") == [260, 259]
    assert t.encode("hello", add_bos=False) == [259]
    assert t.encode("") == [260]
    assert t.decode(t.encode("hello hell"), skip_special=True) == "hello hell"
    g = Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.pre": "gpt2"}))
    assert g.decode(g.encode("x 123 hello")) == "x 123 hello"


def test_unsupported_values_raise():
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(ValueError, match="'mystery-pre'"):
        Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.pre": "mystery-pre"}))
    md = _byte_level_md()
    del md["tokenizer.ggml.model"]
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata(md)
    with pytest.raises(ValueError, match=r"merges\[1\]"):
        Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.merges": ["h e", "ll"]}))
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_metadata(_byte_level_md(**{"tokenizer.ggml.eos_token_id": 9999}))


@pytest.mark.parametrize("over,field", [
    ({"tokenizer.ggml.tokens": np.arange(262, dtype=np.uint32)}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": ["h e", "zz qq"]}, r"merges\[1\]"),
    ({"tokenizer.ggml.merges": ["h e", "h l"]}, r"merges\[1\]"),  # 'hl' is not a token
    ({"tokenizer.ggml.merges": ["h e", 7]}, r"merges\[1\]"),
    ({"tokenizer.ggml.eos_token_id": 3.5}, "eos_token_id"),
    ({"tokenizer.ggml.bos_token_id": np.array([1, 2])}, "bos_token_id"),
])
def test_bad_metadata_is_a_value_error_naming_the_field(over, field):
    """Malformed tokenizer metadata: ValueError naming the key (the tokenizer library's bare
    Exception and TypeErrors before)."""
    with pytest.raises(ValueError, match=field):
        Tokenizer.from_metadata(_byte_level_md(**over))


def test_max_token_bytes():
    t = Tokenizer.from_metadata(_byte_level_md())
    assert t.max_token_bytes == len("hello")  # the longest: "hello" (5 bytes) beats "</s>" (4)
    md = _byte_level_md()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:-2] + ["<s>", "\u00e9" * 3]  # a CONTROL token
    assert Tokenizer.from_metadata(md).max_token_bytes == 6  # 3 x 2 UTF-8 bytes
