"""orcd.tokenizer_cache: remembers which tokenizer contents already passed Tokenizer's checks,
so loading the same model again skips the per-merge validation loop.

Why not a cached tokenizer.json: the `tokenizers` library builds the BPE model from
Python's vocab dict and merge pairs several times faster than it parses its own
tokenizer.json, so what is worth caching is the outcome of
the Python-side checks (every merge is two non-empty tokens of the vocab whose
concatenation is in the vocab too), which take about as long as the build itself.

The key is a sha256 of the content that those checks and the build read: the token
strings, the merges, the pre-tokenizer name, CHECKS_VERSION and the tokenizers version
(lists hashed with every item's length, so no two different lists hash alike). A marker
file `<cache>/tokenizers/<key>.ok` holding its own key records that such content built a
tokenizer; the cache is default_model.cache_dir() ($ORCD_CACHE, else the platformdirs
user cache dir). A missing, unreadable or corrupt marker (any content but its key) is a
miss: the checks run and the marker is written again. An unwritable cache only costs
the shortcut. Markers are only ever written for content that passed, so bad content is
always checked and refused (the cache is trusted as its model files are: a marker written
by hand for bad content would skip the checks). ORCD_TOKENIZER_CACHE=0 turns it off.

Bounds: at most MAX_MARKERS markers (the least recently written go first), each
a few bytes.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from typing import Optional, Sequence

# Bump when Tokenizer's checks of the tokens / merges change: markers of older checks stop matching.
CHECKS_VERSION = 1
MAX_MARKERS = 64
_SUBDIR = "tokenizers"
_SUFFIX = ".ok"


def _disabled() -> bool:
    return os.environ.get("ORCD_TOKENIZER_CACHE", "1").strip().lower() in ("0", "off", "no", "false")


def _hash_strings(h, items: Sequence[str]) -> None:
    """Feeds the strings and each one's length (so ["ab"] and ["a", "b"] differ) to h."""
    h.update(len(items).to_bytes(8, "little"))
    h.update(array("Q", map(len, items)).tobytes())
    h.update("".join(items).encode("utf-8", "surrogatepass"))


def content_key(tokens: Sequence[str], merges: Sequence, pre: str) -> Optional[str]:
    """The sha256 key of this tokenizer content, or None when it cannot be hashed as
    strings (such content is never cached: the checks always run and report it)."""
    try:
        import tokenizers

        h = hashlib.sha256(f"orcd-tokenizer/{CHECKS_VERSION}/{tokenizers.__version__}/{pre}\n".encode())
        _hash_strings(h, tokens)
        _hash_strings(h, merges)
        return h.hexdigest()
    except (TypeError, ValueError, OverflowError, UnicodeError):  # a non-str item, ...
        return None


def cache_folder(create: bool = False) -> Optional[str]:
    from .default_model import cache_dir

    try:
        d = os.path.join(cache_dir(create=False), _SUBDIR)
        if create:
            os.makedirs(d, exist_ok=True)
        return d
    except OSError:
        return None


def marker_path(key: str) -> Optional[str]:
    d = cache_folder()
    return os.path.join(d, key + _SUFFIX) if d else None


def is_validated(key: Optional[str]) -> bool:
    """True when a marker for `key` exists and holds exactly that key."""
    if key is None or _disabled():
        return False
    path = marker_path(key)
    try:
        with open(path, "rb") as f:
            data = f.read(len(key) + 2)
    except (OSError, TypeError):
        return False
    return data.strip() == key.encode()


def mark_validated(key: Optional[str]) -> None:
    """Writes the marker for `key` (atomically); trims the folder to MAX_MARKERS. Never raises."""
    if key is None or _disabled():
        return
    d = cache_folder(create=True)
    if d is None:
        return
    tmp = os.path.join(d, f".{key}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(key + "\n")
        os.replace(tmp, os.path.join(d, key + _SUFFIX))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return
    _trim(d)


def _trim(d: str) -> None:
    try:
        entries = []
        for e in os.scandir(d):
            if e.name.endswith(_SUFFIX):
                try:
                    entries.append((e.stat().st_mtime_ns, e.path))
                except OSError:
                    pass
        entries.sort()
        for _, p in entries[: max(0, len(entries) - MAX_MARKERS)]:
            try:
                os.unlink(p)
            except OSError:
                pass
    except OSError:
        pass
