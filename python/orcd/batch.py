"""Many generations at once: a Python face for the C++ step loop (cpp/step_loop.h).

The loop runs on its own C++ thread (no GIL): it admits requests into free cache slots,
runs prompt chunks and one batched decode step for all running sequences, samples each
with its own sampler and publishes token ids. One Python thread (the pump) takes those
events and hands them to each request's queue, so callers block only on their own
request, and async code can be woken with a callback.

    runner = BatchRunner(path, device="cpu", n_ctx=2048, n_slots=8)
    req = runner.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1), stop_ids=eos_ids)
    for tok in req:            # token ids as they come
        ...
    req.finish_reason          # "stop", "length", "cancelled" or "error"

With params.logprobs = N, req.logprobs holds one orcd.types.TokenLogprobs per token (raw
distribution, cpp/logprobs.h; on the GPU computed next to the logits); with
params.prompt_logprobs = N, req.prompt_logprobs one per prompt token (None for the first),
set before the first token arrives.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np

from . import _orcd
from .backend import cuda_module, open_on_device
from .sizes import parse_bytes
from .types import SamplingParams, TokenLogprobs


class Busy(RuntimeError):
    """The runner's queue is full: retry later (a server answers 429/503)."""


class Request:
    """One submitted generation. Iterate it for token ids; after the end, finish_reason
    ("stop", "length", "cancelled", "error") and, for "error", message. Or set on_event
    (called on the pump thread after each event; .tokens grows, .done tells the end)
    instead of iterating."""

    def __init__(self, runner: "BatchRunner", rid: int, n_prompt: int, logprobs: bool = False,
                 prompt: Optional[Sequence[int]] = None):
        self.id = rid
        self.n_prompt = n_prompt
        self.tokens: List[int] = []
        # appended before the token (a reader that sees n tokens sees their n logprobs)
        self.logprobs: Optional[List[TokenLogprobs]] = [] if logprobs else None
        self.prompt_logprobs: Optional[list] = None
        self._prompt = prompt  # with prompt logprobs: the ids they are of
        self.finish_reason: Optional[str] = None
        self.message = ""
        self._runner = runner
        self._q: "queue.SimpleQueue" = queue.SimpleQueue()
        self._done = threading.Event()
        self.on_event: Optional[Callable[["Request"], None]] = None

    def _push(self, tok: int, finish: str, message: str, extra: Optional[dict] = None) -> None:
        # pump thread. With on_event set the caller reads .tokens / .finish_reason and the
        # events are not queued for iteration (a server would hold every event otherwise).
        if extra is not None:
            if "prompt_logprobs" in extra and self._prompt is not None:
                self.prompt_logprobs = [None] + [TokenLogprobs.from_native(t, pr)
                                                 for t, pr in zip(self._prompt[1:], extra["prompt_logprobs"])]
            if "logprobs" in extra and self.logprobs is not None and tok >= 0:
                self.logprobs.append(TokenLogprobs.from_native(tok, extra["logprobs"]))
        cb = self.on_event
        if cb is None:
            self._q.put((tok, finish, message))
        if tok >= 0:
            self.tokens.append(tok)
        if finish:
            self.finish_reason = finish
            self.message = message
            self._done.set()
        if cb is not None:
            cb(self)

    def __iter__(self) -> Iterator[int]:
        while True:
            tok, finish, _ = self._q.get()
            if tok >= 0:
                yield tok
            if finish:
                return

    def wait(self, timeout: Optional[float] = None) -> "Request":
        """Blocks until the request ends (or timeout); returns self."""
        self._done.wait(timeout)
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Ends the request at the next step ("cancelled"); False if it already ended."""
        return self._runner._loop.cancel(self.id)


class BatchRunner:
    """A model loaded once, generating for many requests at once on the CPU or GPU.

    path: a GGUF file. device: "auto", "cpu" or "cuda". n_ctx: positions per sequence.
    n_slots: sequences generating at once; up to max_waiting more wait for a slot.
    prefill_chunk: prompt tokens evaluated per step (long prompts are cut so the running
    sequences keep generating). kv_memory: bytes of KV memory the sequences share (an int or
    "2GiB"; None: n_slots x n_ctx positions, on the GPU as far as 90% of its free memory allows);
    a request reserves prompt + max_tokens positions when it starts, and waits while they are
    not free.
    """

    def __init__(self, path: str, device: str = "auto", n_ctx: int = 4096, n_slots: int = 8, n_threads: int = 0,
                 max_waiting: int = 256, prefill_chunk: int = 512, kv_memory=None):
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (got {device!r})")
        for name, v, lo in (("n_ctx", n_ctx, 2), ("n_slots", n_slots, 1), ("max_waiting", max_waiting, 0),
                            ("prefill_chunk", prefill_chunk, 1), ("n_threads", n_threads, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo} (got {v!r})")
        self.kv_memory = parse_bytes(kv_memory, "kv_memory")
        args = (str(path), n_ctx, n_slots, n_threads, max_waiting, prefill_chunk, self.kv_memory or 0)
        self._loop = None  # close() / __del__ see a runner whose loop failed to open
        self._loop, self.device = open_on_device(device, lambda: cuda_module().CudaStepLoop(*args),
                                                 lambda: _orcd.StepLoop(*args))
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.n_vocab = self._loop.n_vocab
        self._ids = itertools.count(1)
        self._live: dict = {}
        self._lock = threading.Lock()
        self._closed = False
        self._pump = threading.Thread(target=self._pump_events, name="orcd-batch-pump", daemon=True)
        self._pump.start()

    def submit(self, prompt: Sequence[int], params: Optional[SamplingParams] = None,
               stop_ids: Sequence[int] = (), mask_fn: Optional[Callable] = None,
               cache_prompt: bool = True) -> Request:
        """Queues one generation of prompt (token ids) with params (SamplingParams; its
        max_tokens None means until n_ctx is full, its seed None a fresh random one; stop
        strings are the caller's business). stop_ids: tokens that end it ("stop"). Raises
        ValueError / TypeError for bad input, Busy when the queue is full. mask_fn: structured
        output (an orcd.structured.Constraint, or see StepLoop.submit). cache_prompt=False:
        evaluate the whole prompt even when a free slot holds a prefix of it (llama.cpp's
        cache_prompt: on the GPU a reused prefix changes the rounding of what follows, so only
        then does a seed give the same tokens as the prompt's first evaluation)."""
        if self._closed:
            raise ValueError("the BatchRunner is closed")
        p = (params or SamplingParams()).validate()
        ids = np.asarray(list(prompt), dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("prompt must be a sequence of token ids")
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ValueError(f"prompt token id out of range [0, {self.n_vocab})")
        max_tokens = p.max_tokens if p.max_tokens is not None else self.n_ctx
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        stops = [int(t) for t in stop_ids] + [int(t) for t in (p.stop_token_ids or [])]
        rid = next(self._ids)
        req = Request(self, rid, int(ids.size), p.logprobs is not None,
                      [int(t) for t in ids] if p.prompt_logprobs is not None else None)
        with self._lock:
            self._live[rid] = req
        try:
            ok = self._loop.submit(rid, ids.astype(np.int32), max_tokens, stops, float(p.temperature),
                                   min(int(p.top_k), 2**31 - 1), float(p.top_p), float(p.min_p),
                                   float(p.repetition_penalty), float(p.presence_penalty),
                                   float(p.frequency_penalty), int(p.penalty_last_n), int(seed) & 0xFFFFFFFFFFFFFFFF,
                                   -1 if p.logprobs is None else int(p.logprobs),
                                   -1 if p.prompt_logprobs is None else int(p.prompt_logprobs),
                                   mask_fn=mask_fn, reuse_prefix=bool(cache_prompt))
        except BaseException:
            with self._lock:
                self._live.pop(rid, None)
            raise
        if not ok:
            with self._lock:
                self._live.pop(rid, None)
            raise Busy(f"the queue is full ({self.n_slots} running, waiting list full)")
        return req

    def stats(self) -> dict:
        """running, waiting, steps, prompt_tokens, generated, finished (counts since start);
        kv_positions (the KV pool), kv_reserved (positions held), kv_waits (admissions deferred
        for want of KV memory); host_sampled (decode rows whose logits came to the host to be
        sampled: the CPU engine's every row, on the GPU only parameters beyond its sampler)."""
        return self._loop.stats()

    def _pump_events(self) -> None:
        while True:
            try:
                events = self._loop.take_events(100)
            except ValueError:  # closed
                events = None
            if events is None:
                return
            for ev in events:  # (id, token, finish, message[, logprobs dict])
                rid, tok, finish, message = ev[:4]
                with self._lock:
                    req = self._live.get(rid)
                    if finish:
                        self._live.pop(rid, None)
                if req is not None:
                    req._push(tok, finish, message, ev[4] if len(ev) > 4 else None)
            if self._closed and not events:
                with self._lock:
                    if not self._live:
                        return

    def close(self) -> None:
        """Ends every live request ("cancelled"), stops the loop and frees the engine."""
        if self._closed:
            return
        self._closed = True
        self._loop.shutdown()     # every live request gets its terminal event
        self._pump.join(10)       # the pump hands them out, then ends
        self._loop.close()

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
