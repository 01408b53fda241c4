"""orcd.tokenizer_cache: a tokenizer whose content passed the checks before skips them, gives the
same ids as one built with the checks, and no marker (corrupt, foreign, unwritable) can make bad
content pass."""
from __future__ import annotations

import os

import numpy as np
import pytest

from orcd import tokenizer_cache as tc
from orcd.tokenizer import Tokenizer

CORPUS = [
    "Hello world",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|fim_prefix|>x = 1<|fim_suffix|><|fim_middle|>",
    "Grüße aus Köln — naïve café, 東京タワー, 한국어, עברית, العربية, 🙂🚀👩‍💻",
    "tabs\tand  double  spaces\r\n\r\nand newlines\n\n\n",
    "numbers 1234567890 3.14159 -42 0x1F 1e-9",
    "It's, they're, we've, I'm, you'll, he'd",
    "```python\nimport numpy as np\nprint(np.arange(10)[::2])\n```",
    "    " * 10 + "indented",
    "a" * 300,
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCD_CACHE", str(tmp_path))
    monkeypatch.delenv("ORCD_TOKENIZER_CACHE", raising=False)
    return tmp_path


def _key(md):
    return tc.content_key(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"], md["tokenizer.ggml.pre"])


def _spy(monkeypatch):
    seen = []
    real = tc.is_validated

    def spy(key):
        r = real(key)
        seen.append(r)
        return r
    monkeypatch.setattr(tc, "is_validated", spy)
    return seen


def test_checked_and_known_good_tokenizers_give_the_same_ids(md, cache, monkeypatch):
    from test_tokenizer import _reference_encoder

    key = _key(md)
    assert key is not None and not tc.is_validated(key)
    seen = _spy(monkeypatch)
    checked = Tokenizer.from_metadata(md)
    known = Tokenizer.from_metadata(md)
    assert seen == [False, True], "the first build ran the checks, the second took the known-good path"
    reference = _reference_encoder(md)
    for text in CORPUS:
        for special in (False, True):
            assert known.encode(text, special=special) == checked.encode(text, special=special), (text, special)
        if "<|" not in text:
            assert known.encode(text) == reference(text), text
        assert known.decode(known.encode(text, special=True)) == text
    assert known.eos_ids == checked.eos_ids and known.special_ids == checked.special_ids


def _small_md(**over):
    from test_tokenizer import _byte_level_md
    return _byte_level_md(**over)


BAD_MERGES = {"tokenizer.ggml.merges": ["h e", "h l"]}  # 'hl' is not a token


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"a" * 64 + b"\n", "TRUNCATED", "OTHER_KEY", "DIR"])
def test_a_corrupt_or_foreign_marker_is_ignored_and_rewritten(cache, content):
    good = _small_md()
    good_key = _key(good)
    bad = _small_md(**BAD_MERGES)
    bad_key = _key(bad)
    assert bad_key != good_key
    for key in (good_key, bad_key):
        path = tc.marker_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content == "DIR":
            os.makedirs(path)
            continue
        data = {"TRUNCATED": key[:-1].encode(), "OTHER_KEY": (good_key if key == bad_key else bad_key).encode()}
        with open(path, "wb") as f:
            f.write(data[content] if isinstance(content, str) else content)
    assert not tc.is_validated(bad_key) and not tc.is_validated(good_key)
    with pytest.raises(ValueError, match=r"merges\[1\]"):
        Tokenizer.from_metadata(bad)  # the checks ran: bad content is refused
    assert not tc.is_validated(bad_key)
    t = Tokenizer.from_metadata(good)
    assert t.encode("hello") == [259]
    if content != "DIR":
        assert tc.is_validated(good_key), "the marker was written again"


def test_bad_content_is_never_marked(cache):
    for over in (BAD_MERGES, {"tokenizer.ggml.merges": ["h e", 7]}, {"tokenizer.ggml.eos_token_id": 9999}):
        md = _small_md(**over)
        with pytest.raises(ValueError):
            Tokenizer.from_metadata(md)
        key = _key(md)
        assert key is None or not tc.is_validated(key)
    assert not os.path.isdir(os.path.join(cache, "tokenizers")) or not os.listdir(os.path.join(cache, "tokenizers"))


def test_an_unwritable_cache_still_builds(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ORCD_CACHE", str(blocker))
    for _ in range(2):
        assert Tokenizer.from_metadata(_small_md()).encode("hello hell") == [259, 32, 258]
    assert not tc.is_validated(_key(_small_md()))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        monkeypatch.setenv("ORCD_CACHE", str(ro))
        assert Tokenizer.from_metadata(_small_md()).encode("hello") == [259]


def test_the_key_covers_the_content():
    md = _small_md()
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    base = tc.content_key(tokens, merges, "qwen2")
    assert base == tc.content_key(list(tokens), list(merges), "qwen2")
    others = [
        tc.content_key(tokens, merges, "gpt2"),
        tc.content_key(tokens, merges[:-1], "qwen2"),
        tc.content_key(tokens, merges[::-1], "qwen2"),
        tc.content_key(tokens[:-1], merges, "qwen2"),
        tc.content_key(tokens[:-2] + [tokens[-2] + tokens[-1]], merges, "qwen2"),  # same characters, other split
        tc.content_key(tokens[:-1] + ["</s>\x00"], merges, "qwen2"),
    ]
    assert len({base, *others}) == len(others) + 1
    assert tc.content_key(["ab"], [], "qwen2") != tc.content_key(["a", "b"], [], "qwen2")
    assert tc.content_key(tokens, ["h e", 7], "qwen2") is None
    assert tc.content_key(np.arange(3), merges, "qwen2") is None


def test_markers_are_bounded(cache, monkeypatch):
    monkeypatch.setattr(tc, "MAX_MARKERS", 3)
    keys = [f"{i:064x}" for i in range(7)]
    for i, k in enumerate(keys):
        tc.mark_validated(k)
        os.utime(tc.marker_path(k), ns=(i * 10**9, i * 10**9))  # distinct write times
    left = sorted(f for f in os.listdir(tc.cache_folder()) if f.endswith(".ok"))
    assert len(left) <= 3 and f"{keys[-1]}.ok" in left
    assert tc.is_validated(keys[-1]) and not tc.is_validated(keys[0])


def test_the_switch_turns_it_off(cache, monkeypatch):
    monkeypatch.setenv("ORCD_TOKENIZER_CACHE", "0")
    md = _small_md()
    Tokenizer.from_metadata(md)
    monkeypatch.delenv("ORCD_TOKENIZER_CACHE")
    assert not tc.is_validated(_key(md))
