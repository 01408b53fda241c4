"""orcd.tokenizer: the GGUF file's byte-level BPE tokenizer (Qwen2 / GPT-2 family).

Built from the file's metadata alone (no tokenizer.json needed):

    md = orcd.GGUFFile(path).metadata
    tok = Tokenizer.from_metadata(md)
    ids = tok.encode("Hello world")                 # [9707, 1879] for Qwen2.5
    tok.encode("<|im_start|>user", special=True)    # [151644, 872]
    tok.decode(ids) == "Hello world"

Encoding runs in HF `tokenizers` (BPE model over the GGUF vocab and merges;
pre-tokenizer: the model's split regex, then byte-level mapping; no
normalizer, so decode(encode(s)) == s exactly for every str without lone
surrogates). Decoding is done here from each token's raw bytes, so it is exact
and never depends on how a library cleans up text.

Control tokens (token_type CONTROL) and user-defined tokens (USER_DEFINED) are
special: `encode(text, special=True)` turns their literal text into their ids;
with special=False (the default) that text is encoded as plain bytes, so text
from users can never produce them.
"""
from __future__ import annotations

import codecs
import numbers
import re
import threading
from typing import Iterable, Optional

from . import tokenizer_cache

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (as in llama.cpp's
# llama-vocab.cpp and the models' HF tokenizer.json files).
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Every digit its own piece (HF: Digits(individual_digits=True); llama.cpp: "\p{N}"
# before the GPT-2 expression for smollm, starcoder, refact, command-r, codeshell).
_DIGIT_PATTERN = r"\p{N}"
# o200k (tokenizer.ggml.pre "gpt-4o": GPT-OSS, GPT-4o), the expression of the HF
# tokenizer.json (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O quotes it and runs an
# ASCII-case rewrite of it): words split before an upper-case run ("HelloWorld" ->
# "Hello", "World") with a contraction kept on the word, digits in threes, a
# punctuation run keeps trailing newlines and slashes.
_O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# pre -> (split patterns applied in turn, ignore_merges)
PRE_TOKENIZERS = {
    "qwen2": ((_QWEN2_PATTERN,), False),
    "llama3": ((_LLAMA3_PATTERN,), True),
    "llama-bpe": ((_LLAMA3_PATTERN,), True),
    "gpt2": ((_GPT2_PATTERN,), False),
    "smollm": ((_DIGIT_PATTERN, _GPT2_PATTERN), False),
    "starcoder": ((_DIGIT_PATTERN, _GPT2_PATTERN), False),
    "gpt-4o": ((_O200K_PATTERN,), False),
}

# Text of tokens that end a turn in the chat templates orcd knows (ChatML, Gemma, and
# gpt-oss's harmony: <|return|> ends the final answer, <|call|> a tool call, as in HF's
# generation_config and llama.cpp's end-of-generation set; harmony's <|end|> closes a
# message inside the turn (the analysis channel comes before the final one), so it is
# not a stop token: llama.cpp drops it from its set when <|return|> and <|call|> exist).
_EOS_TEXTS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|return|>", "<|call|>")


def _bytes_to_unicode() -> dict:
    """GPT-2's byte <-> printable character table (byte value -> char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
# str.translate table: byte-level char -> the latin-1 char of its byte value.
_TRANSLATE = {ord(c): chr(b) for c, b in _CHAR_TO_BYTE.items()}


def _byte_level_to_bytes(s: str) -> bytes:
    t = s.translate(_TRANSLATE)
    try:
        return t.encode("latin-1")
    except UnicodeEncodeError:
        # A char outside the byte-level alphabet: keep it as its UTF-8.
        return b"".join(bytes([ord(c)]) if ord(c) < 256 else c.encode("utf-8") for c in t)


def _opt_int(md: dict, key: str) -> Optional[int]:
    v = md.get(key)
    if v is None:
        return None
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    raise ValueError(f"tokenizer metadata: {key} must be an integer (got {v!r})")


class Tokenizer:
    """Byte-level BPE tokenizer built from GGUF metadata. Thread-safe."""

    def __init__(self, tokens: list, merges: list, token_types: Optional[list] = None,
                 pre: str = "qwen2", bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, add_bos: bool = False):
        try:
            from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("orcd's tokenizer needs the 'tokenizers' package") from e

        tokens = list(tokens)
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise ValueError(f"tokenizer metadata: tokenizer.ggml.tokens must be an array of strings "
                                 f"(entry {i} is {type(t).__name__} {t!r})")
        n = len(tokens)
        if n == 0:
            raise ValueError("tokenizer metadata: tokenizer.ggml.tokens is empty")
        if token_types is None:
            token_types = [TOKEN_NORMAL] * n
        try:
            token_types = [int(t) for t in (token_types.tolist() if hasattr(token_types, "tolist")
                                            else token_types)]
        except (TypeError, ValueError):
            raise ValueError("tokenizer metadata: tokenizer.ggml.token_type must be an array of integers") from None
        if len(token_types) != n:
            raise ValueError(f"tokenizer metadata: tokenizer.ggml.token_type has {len(token_types)} "
                             f"entries for {n} tokens")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported tokenizer pre-tokenizer tokenizer.ggml.pre={pre!r} "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        for name, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("padding_token_id", pad_id)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"tokenizer metadata: tokenizer.ggml.{name}={v} is out of range [0, {n})")

        self._tokens = tokens
        self._types = token_types
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = bool(add_bos)

        # On a duplicate string keep the first id (built backwards so it wins).
        vocab = dict(zip(reversed(tokens), range(n - 1, -1, -1)))
        # Content that built a tokenizer before skips the per-merge checks (see tokenizer_cache).
        content_key = tokenizer_cache.content_key(tokens, merges, pre)
        known_good = tokenizer_cache.is_validated(content_key)
        pairs = [tuple(m.split(" ")) for m in merges] if known_good else []
        for k, m in enumerate(() if known_good else merges):
            pr = tuple(m.split(" ")) if isinstance(m, str) else ()
            if len(pr) != 2 or not pr[0] or not pr[1]:
                raise ValueError(f"tokenizer metadata: tokenizer.ggml.merges[{k}]={m!r} "
                                 "is not two tokens separated by one space")
            for part in pr + (pr[0] + pr[1],):
                if part not in vocab:
                    raise ValueError(f"tokenizer metadata: tokenizer.ggml.merges[{k}]={m!r} names "
                                     f"{part!r}, which is not in tokenizer.ggml.tokens")
            pairs.append(pr)

        patterns, ignore_merges = PRE_TOKENIZERS[pre]

        try:
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        except Exception as e:  # the library raises a bare Exception on vocab / merge problems
            raise ValueError(f"tokenizer metadata (tokenizer.ggml.tokens / merges): {e}") from None
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
        # Control / user-defined tokens are special added tokens: matched in the
        # text by encode(special=True); encode(special=False) switches that off
        # (encode_special_tokens), under a lock since the switch is shared.
        self._special_ids = [i for i, ty in enumerate(token_types)
                             if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        if self._special_ids:
            hf.add_special_tokens([
                AddedToken(tokens[i], special=True, normalized=False, single_word=False,
                           lstrip=False, rstrip=False)
                for i in self._special_ids
            ])
            # Added tokens must map back to their file ids.
            for i in self._special_ids:
                got = hf.token_to_id(tokens[i])
                if got != vocab[tokens[i]]:
                    raise ValueError(f"tokenizer: special token {tokens[i]!r} got id {got}, "
                                     f"expected {vocab[tokens[i]]}")
        self._hf = hf
        self._hf_lock = threading.Lock()

        self._special_set = frozenset(self._special_ids)
        # Tokens dropped by decode(skip_special=True): control and unused ones.
        self._skip_set = frozenset(i for i, ty in enumerate(token_types)
                                   if ty in (TOKEN_CONTROL, TOKEN_UNUSED))
        self._bytes_cache: list = [None] * n
        self._max_token_bytes: Optional[int] = None
        self._special_rx = None

        eos = set()
        if eos_id is not None:
            eos.add(eos_id)
        for text in _EOS_TEXTS:
            i = vocab.get(text)
            if i is not None:
                eos.add(i)
        self.eos_ids = frozenset(eos)
        if not known_good:
            tokenizer_cache.mark_validated(content_key)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_metadata(cls, md: dict) -> "Tokenizer":
        """From a GGUF metadata dict (orcd.GGUFFile(path).metadata): a Tokenizer for
        tokenizer.ggml.model 'gpt2', an orcd.tokenizer_spm.SpmTokenizer (same methods)
        for 'llama'."""
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("the file has no tokenizer (tokenizer.ggml.model is missing)")
        if model == "llama":  # SentencePiece BPE with scores (Gemma 3): orcd.tokenizer_spm
            from .tokenizer_spm import SpmTokenizer
            return SpmTokenizer.from_metadata(md)
        if model != "gpt2":
            raise ValueError(f"unsupported tokenizer model tokenizer.ggml.model={model!r} "
                             "(orcd supports byte-level BPE 'gpt2' and SentencePiece BPE 'llama')")
        pre = md.get("tokenizer.ggml.pre", "gpt2")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"unsupported tokenizer pre-tokenizer tokenizer.ggml.pre={pre!r} "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("tokenizer metadata: tokenizer.ggml.tokens is missing")
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError("tokenizer metadata: tokenizer.ggml.merges is missing")
        types = md.get("tokenizer.ggml.token_type")
        return cls(
            list(tokens), list(merges), types, pre=pre,
            bos_id=_opt_int(md, "tokenizer.ggml.bos_token_id"),
            eos_id=_opt_int(md, "tokenizer.ggml.eos_token_id"),
            pad_id=_opt_int(md, "tokenizer.ggml.padding_token_id"),
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
        )

    # ------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    @property
    def special_ids(self) -> frozenset:
        """Ids that encode(special=True) can produce from their literal text."""
        return self._special_set

    @property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for (control tokens: their text), so a text of
        more than n * max_token_bytes UTF-8 bytes cannot encode to n tokens or fewer."""
        if self._max_token_bytes is None:
            special = (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED)
            self._max_token_bytes = max(
                max(len(s.encode("utf-8")) if ty in special else len(_byte_level_to_bytes(s)), 1)
                for s, ty in zip(self._tokens, self._types))
        return self._max_token_bytes

    def special_regex(self):
        """Compiled regex matching the text of any special token (longest first
        at each position, as special parsing does), or None if there are none."""
        if self._special_rx is None:
            texts = sorted({self._tokens[i] for i in self._special_ids if self._tokens[i]},
                           key=lambda t: (-len(t), t))
            self._special_rx = (re.compile("|".join(re.escape(t) for t in texts)) if texts else None,)
        return self._special_rx[0]

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the file (byte-level form for normal tokens)."""
        return self._tokens[self._check_id(token_id)]

    def token_type(self, token_id: int) -> int:
        return int(self._types[self._check_id(token_id)])

    def token_to_id(self, text: str) -> Optional[int]:
        """Id of a token given its stored string, or None."""
        return self._hf.token_to_id(text)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    # ------------------------------------------------------------ encode
    def encode(self, text: str, special: bool = False, add_bos: Optional[bool] = None) -> list:
        """Token ids of `text`. special=True parses control-token text
        ("<|im_start|>") into their ids; special=False encodes it as plain text.
        add_bos: prepend BOS (default: the file's tokenizer.ggml.add_bos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str (got {type(text).__name__})")
        ids = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        if text:
            try:
                with self._hf_lock:
                    self._hf.encode_special_tokens = not special
                    enc = self._hf.encode(text, add_special_tokens=False)
            except Exception as e:  # lone surrogates etc. (cannot be UTF-8)
                raise ValueError(f"cannot encode text: {e}") from e
            ids.extend(enc.ids)
        return ids

    # ------------------------------------------------------------ decode
    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} out of range [0, {len(self._tokens)})")
        return i

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes the token stands for (a piece of UTF-8, possibly partial).
        Control, user-defined and unused tokens stand for their text."""
        i = self._check_id(token_id)
        b = self._bytes_cache[i]
        if b is None:
            s = self._tokens[i]
            ty = int(self._types[i])
            if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED):
                b = s.encode("utf-8")
            else:
                b = _byte_level_to_bytes(s)
            self._bytes_cache[i] = b
        return b

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        skip = self._skip_set if skip_special else ()
        return b"".join(self.token_to_bytes(i) for i in ids if not (skip and int(i) in skip))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
        skip_special drops control and unused tokens."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"<orcd.Tokenizer pre={self.pre!r} n_vocab={self.n_vocab}>"


class StreamDecoder:
    """Incremental detokenizer: feed(id) returns the text that is complete so
    far, holding back the bytes of a multi-byte character until its last byte
    arrives; flush() returns what is left (U+FFFD for an incomplete tail).

        d = StreamDecoder(tok)
        text = "".join(d.feed(t) for t in ids) + d.flush()   # == tok.decode(ids)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.skip_special and int(token_id) in self.tokenizer._skip_set:
            return ""
        return self._dec.decode(self.tokenizer.token_to_bytes(token_id))

    def flush(self) -> str:
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def reset(self):
        self._dec.reset()
