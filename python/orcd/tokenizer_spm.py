"""orcd.tokenizer_spm: the GGUF "llama" tokenizer model (SentencePiece BPE with
byte fallback), as Gemma 3's files carry it: tokens with scores and types, no merges.

    tok = SpmTokenizer.from_metadata(md)     # Tokenizer.from_metadata picks it for model 'llama'
    tok.encode("Hello world")                # ids
    tok.decode(ids)

Encoding follows SentencePiece's BPE as llama.cpp runs it on GGUF files: spaces
become U+2581 ("▁"); the text starts as one symbol per character; the adjacent
pair whose concatenation is a normal vocabulary token with the highest score is
merged (the leftmost on a tie) until no pair is left; a character that is not a
token becomes its UTF-8 bytes' <0xXX> tokens. Only NORMAL tokens are merge
targets. User-defined tokens (Gemma's "\n", "\n\n", whitespace runs, HTML tags)
are matched in the text first, always, as SentencePiece and llama.cpp do; control
tokens ("<start_of_turn>") only with special=True, so text from users never
produces them.
Decoding maps each token to its bytes (▁ -> space, <0xXX> -> the byte), exact.

Cost: O(n log n) per piece of text between special tokens, in Python; fine for
prompts and chat turns (tens of kB), not meant for bulk corpora.
"""
from __future__ import annotations

import heapq
import re
from typing import Iterable, List, Optional

from .tokenizer import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED,
                        _EOS_TEXTS, _opt_int)

_SPACE = "\u2581"
_BYTE_RX = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SpmTokenizer:
    """SentencePiece-BPE tokenizer built from GGUF metadata. Thread-safe (no shared state
    is written after construction, except caches filled idempotently)."""

    pre = "spm"

    def __init__(self, tokens: list, scores, token_types, bos_id: Optional[int] = None,
                 eos_id: Optional[int] = None, pad_id: Optional[int] = None, unk_id: Optional[int] = None,
                 add_bos: bool = False, add_space_prefix: bool = False):
        tokens = list(tokens)
        n = len(tokens)
        if n == 0:
            raise ValueError("tokenizer metadata: tokenizer.ggml.tokens is empty")
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise ValueError(f"tokenizer metadata: tokenizer.ggml.tokens must be an array of strings "
                                 f"(entry {i} is {type(t).__name__} {t!r})")
        try:
            scores = [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]
            types = [int(t) for t in (token_types.tolist() if hasattr(token_types, "tolist") else token_types)]
        except (TypeError, ValueError):
            raise ValueError("tokenizer metadata: tokenizer.ggml.scores / token_type must be numeric arrays") \
                from None
        if len(scores) != n or len(types) != n:
            raise ValueError(f"tokenizer metadata: {len(scores)} scores and {len(types)} token types "
                             f"for {n} tokens")
        for name, v in (("bos_token_id", bos_id), ("eos_token_id", eos_id), ("padding_token_id", pad_id),
                        ("unknown_token_id", unk_id)):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"tokenizer metadata: tokenizer.ggml.{name}={v} is out of range [0, {n})")
        self._tokens, self._scores, self._types = tokens, scores, types
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.add_space_prefix = bool(add_space_prefix)
        # merge targets: normal tokens by text (first id wins on duplicates)
        self._piece = {}
        for i in range(n - 1, -1, -1):
            if types[i] == TOKEN_NORMAL:
                self._piece[tokens[i]] = i
        self._byte_id = {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TOKEN_BYTE:
                m = _BYTE_RX.fullmatch(t)
                if m:
                    self._byte_id.setdefault(int(m.group(1), 16), i)
        self._by_text = {}
        for i in range(n - 1, -1, -1):
            self._by_text[tokens[i]] = i
        self._special_ids = [i for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
        self._special_set = frozenset(self._special_ids)
        self._skip_set = frozenset(i for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_UNUSED))
        self._bytes_cache: list = [None] * n
        self._max_token_bytes: Optional[int] = None
        self._special_rx = None
        self._user_rx = None
        eos = set() if eos_id is None else {eos_id}
        for text in _EOS_TEXTS:
            i = self._by_text.get(text)
            if i is not None and types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                eos.add(i)
        self.eos_ids = frozenset(eos)

    @classmethod
    def from_metadata(cls, md: dict) -> "SpmTokenizer":
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("tokenizer metadata: tokenizer.ggml.tokens is missing")
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("tokenizer metadata: tokenizer.ggml.scores is missing (needed by the 'llama' "
                             "SentencePiece tokenizer)")
        types = md.get("tokenizer.ggml.token_type")
        if types is None:
            raise ValueError("tokenizer metadata: tokenizer.ggml.token_type is missing")
        return cls(list(tokens), scores, types,
                   bos_id=_opt_int(md, "tokenizer.ggml.bos_token_id"),
                   eos_id=_opt_int(md, "tokenizer.ggml.eos_token_id"),
                   pad_id=_opt_int(md, "tokenizer.ggml.padding_token_id"),
                   unk_id=_opt_int(md, "tokenizer.ggml.unknown_token_id"),
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", False)),
                   add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", False)))

    # ------------------------------------------------------------ properties (as Tokenizer)
    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    @property
    def special_ids(self) -> frozenset:
        return self._special_set

    @property
    def max_token_bytes(self) -> int:
        if self._max_token_bytes is None:
            self._max_token_bytes = max(max(len(self.token_to_bytes(i)), 1) for i in range(self.n_vocab))
        return self._max_token_bytes

    def _regex_of(self, ids):
        texts = sorted({self._tokens[i] for i in ids if self._tokens[i]}, key=lambda t: (-len(t), t))
        return re.compile("|".join(re.escape(t) for t in texts)) if texts else None

    def special_regex(self):
        """Compiled regex of the control and user-defined tokens' text (longest first), or None."""
        if self._special_rx is None:
            self._special_rx = (self._regex_of(self._special_ids),)
        return self._special_rx[0]

    def _user_regex(self):
        if self._user_rx is None:
            self._user_rx = (self._regex_of([i for i in self._special_ids if self._types[i] == TOKEN_USER_DEFINED]),)
        return self._user_rx[0]

    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < len(self._tokens):
            raise ValueError(f"token id {i} out of range [0, {len(self._tokens)})")
        return i

    def token_text(self, token_id: int) -> str:
        return self._tokens[self._check_id(token_id)]

    def token_type(self, token_id: int) -> int:
        return int(self._types[self._check_id(token_id)])

    def token_to_id(self, text: str) -> Optional[int]:
        return self._by_text.get(text)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_set

    # ------------------------------------------------------------ encode
    def _encode_piece(self, text: str) -> List[int]:
        """SentencePiece BPE of plain text (no special tokens)."""
        text = text.replace(" ", _SPACE)
        sym = list(text)
        n = len(sym)
        if n == 0:
            return []
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap = []
        piece, scores = self._piece, self._scores

        def push(a: int, b: int) -> None:
            if a < 0 or b < 0:
                return
            t = sym[a] + sym[b]
            i = piece.get(t)
            if i is not None:
                heapq.heappush(heap, (-scores[i], a, b, len(t)))

        for a in range(n - 1):
            push(a, a + 1)
        while heap:
            _, a, b, size = heapq.heappop(heap)
            # stale: a symbol already merged away or grown since this pair was queued
            if not sym[a] or not sym[b] or nxt[a] != b or len(sym[a]) + len(sym[b]) != size:
                continue
            sym[a] += sym[b]
            sym[b] = ""
            nxt[a] = nxt[b]
            if nxt[b] >= 0:
                prev[nxt[b]] = a
            push(prev[a], a)
            push(a, nxt[a])
        ids = []
        a = 0
        while a >= 0:
            s = sym[a]
            i = piece.get(s)
            if i is not None:
                ids.append(i)
            else:  # byte fallback, else the unknown token
                for byte in s.encode("utf-8"):
                    bi = self._byte_id.get(byte)
                    if bi is None:
                        if self.unk_id is None:
                            raise ValueError(f"cannot encode {s!r}: no <0x{byte:02X}> token and no unknown token")
                        bi = self.unk_id
                    ids.append(bi)
            a = nxt[a]
        return ids

    def encode(self, text: str, special: bool = False, add_bos: Optional[bool] = None) -> list:
        """Token ids of `text`; special=True turns control / user-defined token text into
        their ids; add_bos: prepend BOS (default: the file's tokenizer.ggml.add_bos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str (got {type(text).__name__})")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"cannot encode text: {e}") from e
        ids = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        if self.add_space_prefix and text:
            text = " " + text
        rx = self.special_regex() if special else self._user_regex()
        if rx is None:
            ids.extend(self._encode_piece(text))
            return ids
        pos = 0
        for m in rx.finditer(text):
            ids.extend(self._encode_piece(text[pos:m.start()]))
            ids.append(self._by_text[m.group(0)])
            pos = m.end()
        ids.extend(self._encode_piece(text[pos:]))
        return ids

    # ------------------------------------------------------------ decode
    def token_to_bytes(self, token_id: int) -> bytes:
        i = self._check_id(token_id)
        b = self._bytes_cache[i]
        if b is None:
            s, ty = self._tokens[i], self._types[i]
            m = _BYTE_RX.fullmatch(s) if ty == TOKEN_BYTE else None
            if m:
                b = bytes([int(m.group(1), 16)])
            elif ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED):
                b = s.encode("utf-8")
            else:
                b = s.replace(_SPACE, " ").encode("utf-8")
            self._bytes_cache[i] = b
        return b

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        skip = self._skip_set if skip_special else ()
        return b"".join(self.token_to_bytes(i) for i in ids if not (skip and int(i) in skip))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"<orcd.SpmTokenizer n_vocab={self.n_vocab}>"
