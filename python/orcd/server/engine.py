"""The serving engine: one object owning the model's tokenizer, chat template and
BatchRunner (the C++ step loop), turning a request into text pieces for asyncio code.

    eng = ServeEngine(model=None, device="cpu", n_ctx=4096, max_seqs=64, max_queue=256)
    eng.load()                       # blocking (a background thread in the server)
    eng.attach(asyncio.get_running_loop())
    ids = eng.encode_prompt("def fib(n):")           # or eng.encode_chat(messages)
    wake = asyncio.Event()
    gen = eng.start(ids, SamplingParams(...), wake, t_arrival=time.monotonic())
    async for batch in follow_batches([gen], wake):   # per wake: [(i, new text, ended), ...]
        ...
    gen.finish_reason, gen.completion_tokens

The per-token loop stays in C++: BatchRunner's pump thread appends token ids to each
request and calls its on_event, which here only schedules (coalesced: at most one
call_soon_threadsafe pending for all requests) the setting of the generation's asyncio
Event. Python runs once per wake, not per engine step: detokenization (the tokens' bytes
from a table built at load, through one incremental UTF-8 decoder per generation, as
StreamDecoder), stop strings (the request is cancelled at the match; text that may start
a stop string is held back, as Model._run does) and the caller's SSE framing, which
writes everything one wake produced for a response at once (follow_batches).

A generation ends exactly once (finish_reason "stop", "length", "cancelled" or "error"):
from the engine's terminal event, at a stop-string match, or at once when cancel() is
called (its C++ request is cancelled too and frees its slot at the next step).

Bounds: a prompt must leave room for one generated token (len(ids) < n_ctx); texts
longer than n_ctx * tokenizer.max_token_bytes UTF-8 bytes are refused before tokenizing;
generation stops with "length" at n_ctx positions whatever max_tokens says.
"""
from __future__ import annotations

import asyncio
import codecs
import os
import threading
import time
from typing import AsyncIterator, List, Optional, Sequence, Set, Tuple

from ..batch import BatchRunner, Busy  # noqa: F401  (Busy re-exported for the handlers)
from ..chat import ChatTemplate, encode_chat
from ..default_model import resolve_model
from ..gguf_file import GGUFFile
from ..model import _find_stop, _stop_prefix_len
from ..tokenizer import Tokenizer
from ..types import SamplingParams

# llama.cpp's general.file_type values (LlamaFileType) -> the usual quantization names.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class Unavailable(RuntimeError):
    """The engine is loading, draining or closed: the server answers 503."""


class ContextOverflow(ValueError):
    """The prompt does not fit in the context (n_ctx positions per sequence)."""


class ServeEngine:
    def __init__(self, model: Optional[str] = None, device: str = "auto", n_ctx: int = 4096, max_seqs: int = 64,
                 max_queue: int = 256, n_threads: int = 0, prefill_chunk: int = 512, metrics=None,
                 kv_memory=None):
        self.model_arg = model
        self.device_arg = device
        self.n_ctx = n_ctx
        self.max_seqs = max_seqs
        self.max_queue = max_queue
        self.n_threads = n_threads
        self.prefill_chunk = prefill_chunk
        self.kv_memory = kv_memory
        self.metrics = metrics
        self.state = "loading"          # "loading" -> "ready" -> "closed"; "failed" if load() raised
        self.error = ""
        self.path: Optional[str] = None
        self.model_id: Optional[str] = None
        self.created = int(time.time())
        self.runner: Optional[BatchRunner] = None
        self.tokenizer: Optional[Tokenizer] = None
        self.token_bytes: List[bytes] = []  # token id -> its bytes (tokenizer.token_to_bytes)
        self.chat_template: Optional[ChatTemplate] = None
        self.has_chat_template = False
        self.live: Set["Generation"] = set()
        self._file: Optional[GGUFFile] = None
        self._md: dict = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wake_lock = threading.Lock()
        self._to_wake: Set[asyncio.Event] = set()
        self._wake_pending = False

    # ------------------------------------------------------------ lifetime
    def load(self) -> None:
        """Resolves the model (assembling the default one on first use), builds the
        tokenizer and chat template and starts the step loop. Blocking."""
        try:
            path = resolve_model(self.model_arg)
            self.path = path
            self.model_id = os.path.splitext(os.path.basename(path))[0]
            self._file = GGUFFile(path)
            md = self._file.metadata
            self._md = md
            tok = Tokenizer.from_metadata(md)
            text = (lambda t: tok.token_text(t) if t is not None else "")
            template = md.get("tokenizer.chat_template")
            self.has_chat_template = isinstance(template, str) and bool(template.strip())
            self.chat_template = ChatTemplate(template, bos_token=text(tok.bos_id), eos_token=text(tok.eos_id))
            self.use_tokenizer(tok)
            self.runner = BatchRunner(path, device=self.device_arg, n_ctx=self.n_ctx, n_slots=self.max_seqs,
                                      n_threads=self.n_threads, max_waiting=self.max_queue,
                                      prefill_chunk=self.prefill_chunk, kv_memory=self.kv_memory)
            if self.metrics is not None:
                self.metrics.bind_engine(self.stats, self.max_seqs, self.vram_bytes_used)
            self._warm_up()
            self.state = "ready"
        except BaseException as e:
            self.state = "failed"
            self.error = str(e) or type(e).__name__
            raise

    def use_tokenizer(self, tok: Tokenizer) -> None:
        """The tokenizer the generations detokenize with (and its bytes table)."""
        self.tokenizer = tok
        self.token_bytes = [tok.token_to_bytes(i) for i in range(tok.n_vocab)]

    def _warm_up(self) -> None:
        """A few short generations before the server says it is ready, so the first client
        does not pay for what the engine does once (cuBLAS handles and workspaces, CUDA
        graphs of the first batch shapes, the sampler's buffers). Not counted in /metrics."""
        ids = self.tokenizer.encode("def fib(n):")
        runs = [SamplingParams(max_tokens=4, temperature=0.0),
                SamplingParams(max_tokens=4, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, seed=1)]
        for batch in ([runs[0]], [runs[1]], runs):  # one greedy, one sampled, then both at once
            reqs = []
            for p in batch:
                try:
                    reqs.append(self.runner.submit(ids, p))
                except Busy:  # one slot and no waiting room (--max-seqs 1 --max-queue 0): one at a time
                    for r in reqs:
                        r.wait(60.0)
                    reqs.append(self.runner.submit(ids, p))
            for r in reqs:
                r.wait(60.0)
                if not r.done or r.finish_reason == "error":
                    raise RuntimeError(f"the warm-up generation failed: {r.message or 'no answer in 60 s'}")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The asyncio loop whose Events the engine's pump thread wakes."""
        self._loop = loop

    def close(self) -> None:
        """Ends every live request (each C++ request gets its terminal event), stops the
        step loop and frees the model. Blocking."""
        self.state = "closed"
        if self.runner is not None:
            self.runner.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # ------------------------------------------------------------ description
    def stats(self) -> dict:
        if self.runner is None or self.state == "closed":
            return {"running": 0, "waiting": 0}
        try:
            return self.runner.stats()
        except ValueError:  # closed meanwhile
            return {"running": 0, "waiting": 0}

    @property
    def device(self) -> Optional[str]:
        return self.runner.device if self.runner is not None else None

    def quant_kind(self) -> Optional[str]:
        """The file's quantization (general.file_type), else its most common weight type."""
        ft = self._md.get("general.file_type")
        if ft is not None and int(ft) in FILE_TYPES:
            return FILE_TYPES[int(ft)]
        if self._file is None:
            return None
        by_bytes: dict = {}
        for t in self._file.tensors:
            if len(t.shape) >= 2:
                by_bytes[t.type] = by_bytes.get(t.type, 0) + t.nbytes
        return max(by_bytes, key=by_bytes.get) if by_bytes else None

    def tokenizer_kind(self) -> Optional[str]:
        """tokenizer.ggml.model and its pre-tokenizer, e.g. "gpt2/qwen2" (byte-level BPE)."""
        m = self._md.get("tokenizer.ggml.model")
        if m is None:
            return None
        pre = self._md.get("tokenizer.ggml.pre")
        return f"{m}/{pre}" if pre else str(m)

    def cuda_device(self) -> Optional[dict]:
        """orcd._orcd_cuda.device_info(0) when the engine runs on the GPU, else None."""
        if self.device != "cuda":
            return None
        from ..backend import cuda_module

        try:
            return cuda_module().device_info(0)
        except Exception:  # noqa: BLE001 - a description, never a failure
            return None

    def vram_bytes_used(self) -> Optional[int]:
        d = self.cuda_device()
        if not d:
            return None
        return int(d["total_memory"]) - int(d["free_memory"])

    @property
    def max_prompt_bytes(self) -> int:
        """Longest text (UTF-8 bytes) that could fit in n_ctx tokens (see Model.max_prompt_bytes)."""
        return self.n_ctx * self.tokenizer.max_token_bytes

    # ------------------------------------------------------------ prompts (blocking: run them in a thread)
    def _check_bytes(self, n: int, what: str) -> None:
        if n > self.max_prompt_bytes:
            raise ContextOverflow(f"{what} of {n:,} bytes cannot fit in the context of {self.n_ctx} tokens "
                                  f"(at most {self.max_prompt_bytes:,} bytes)")

    def _check_ids(self, ids: List[int], what: str) -> List[int]:
        if not ids:
            raise ValueError(f"{what} is empty")
        if len(ids) >= self.n_ctx:
            raise ContextOverflow(f"{what} of {len(ids)} tokens does not fit in the context of {self.n_ctx} "
                                  "tokens (it must leave room for at least one generated token)")
        return ids

    def encode_prompt(self, text: str) -> List[int]:
        """Token ids of a completion prompt (control-token text parsed, as Model.generate does)."""
        self._check_bytes(len(text.encode("utf-8", "surrogatepass")), "prompt")
        return self._check_ids(self.tokenizer.encode(text, special=True), "prompt")

    def check_ids(self, ids: Sequence[int]) -> List[int]:
        """A prompt given as token ids: each in [0, n_vocab), fitting the context."""
        out = []
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.runner.n_vocab:
                raise ValueError(f"prompt token id {t!r} is not an integer in [0, {self.runner.n_vocab})")
            out.append(t)
        return self._check_ids(out, "prompt")

    def encode_chat(self, messages: list, tools: Optional[list] = None) -> List[int]:
        """Token ids of a conversation rendered with the model's chat template (tools: the
        OpenAI tool definitions it renders; assistant tool_calls in the history too)."""
        from ..tools import template_messages

        messages = template_messages(messages)
        n = sum(len(m["content"].encode("utf-8", "surrogatepass")) for m in messages
                if isinstance(m, dict) and isinstance(m.get("content"), str))
        self._check_bytes(n, "messages")
        try:
            ids = encode_chat(self.tokenizer, self.chat_template, messages, True, tools=tools,
                              max_bytes=self.max_prompt_bytes, n_ctx=self.n_ctx)
        except ValueError as e:
            if "cannot fit in n_ctx" in str(e):
                raise ContextOverflow(str(e)) from None
            raise
        return self._check_ids(ids, "conversation")

    # ------------------------------------------------------------ generations
    def start(self, ids: List[int], params: SamplingParams, wake: asyncio.Event,
              t_arrival: Optional[float] = None, mask_fn=None, cache_prompt: bool = True) -> "Generation":
        """Submits one generation (call on the event loop's thread). Raises Unavailable
        (not ready), Busy (queue full), ValueError / TypeError (bad parameters).
        mask_fn: structured output (an orcd.structured.Constraint). cache_prompt: reuse a free
        slot's cached prefix (BatchRunner.submit)."""
        if self.state != "ready":
            raise Unavailable(f"the model is {self.state}")
        if params.max_tokens is not None and params.max_tokens > self.n_ctx:  # the context ends it first
            params = params.replace(max_tokens=self.n_ctx)
        stop_ids = () if params.ignore_eos else sorted(self.tokenizer.eos_ids)
        try:
            req = self.runner.submit(ids, params, stop_ids=stop_ids, mask_fn=mask_fn, cache_prompt=cache_prompt)
        except ValueError as e:
            if "closed" in str(e):
                raise Unavailable("the server is shutting down") from None
            raise
        gen = Generation(self, req, len(ids), params.stop_strings(), wake,
                         time.monotonic() if t_arrival is None else t_arrival)
        self.live.add(gen)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(ids))
        req.on_event = lambda _r, w=wake: self._notify(w)
        return gen

    def _notify(self, wake: asyncio.Event) -> None:
        # pump thread: one call_soon_threadsafe for every wake requested until it runs.
        # Never raises: an exception here would end the pump thread and strand every request.
        with self._wake_lock:
            self._to_wake.add(wake)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._run_wakes)
        except (RuntimeError, AttributeError):  # the loop is closed (or was never attached): nobody waits
            with self._wake_lock:
                self._wake_pending = False

    def _run_wakes(self) -> None:
        with self._wake_lock:
            wakes, self._to_wake = self._to_wake, set()
            self._wake_pending = False
        for w in wakes:
            w.set()

    def _ended(self, gen: "Generation") -> None:
        self.live.discard(gen)
        m = self.metrics
        if m is None:
            return
        m.outcome(gen.finish_reason)
        m.generated_tokens.inc(gen.completion_tokens)
        if gen.t_first is not None:
            m.ttft.observe(gen.t_first - gen.t_arrival)
            if gen.completion_tokens > 1:
                m.tpot.observe((gen.t_last - gen.t_first) / (gen.completion_tokens - 1))


class Generation:
    """One running generation, read on the event loop's thread with poll()."""

    def __init__(self, engine: ServeEngine, req, prompt_tokens: int, stops: List[str], wake: asyncio.Event,
                 t_arrival: float):
        self.engine = engine
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None   # "stop", "length", "cancelled", "error"
        self.message = ""
        self.wake = wake
        self.t_arrival = t_arrival
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self._stops = stops
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # StreamDecoder's
        self._held = ""  # text that may start a stop string
        self._seen = 0   # req.tokens consumed
        self._lp_taken = 0  # req.logprobs handed out by take_logprobs

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def cancel(self, message: str = "cancelled") -> None:
        """Ends the generation now ("cancelled"; call on the loop's thread); the engine
        frees its slot at its next step."""
        if self.finish_reason is not None:
            return
        self.req.cancel()
        self._end("cancelled", message)
        self.wake.set()

    @property
    def prompt_logprobs(self) -> Optional[list]:
        """With params.prompt_logprobs: one TokenLogprobs per prompt token (None for the
        first), once the generation's first event has arrived; else None."""
        return self.req.prompt_logprobs

    def take_logprobs(self) -> list:
        """With params.logprobs: the TokenLogprobs of the tokens poll() consumed since the
        last call (those after a stop-string match are never consumed); else []."""
        lps = self.req.logprobs
        if lps is None:
            return []
        out = lps[self._lp_taken:self._seen]  # the pump appends a token's logprobs before the token
        self._lp_taken = self._seen
        return out

    def poll(self) -> Tuple[str, bool]:
        """(text produced since the last poll, whether the generation has ended)."""
        if self.finish_reason is not None:
            return "", True
        req = self.req
        done = req.done  # first: once done, every token is already in req.tokens
        toks = req.tokens
        n = len(toks)
        seen = self._seen
        if seen == n and not done:
            return "", False
        text = ""
        if seen < n:
            now = time.monotonic()
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
            if self._stops:
                text, stopped = self._take_with_stops(toks, seen, n)
                if stopped:
                    return text, True
            else:  # no stop strings: the wake's tokens decode at once (the same text, UTF-8 safe)
                text = self._utf8.decode(self._bytes_of(toks[seen:n]))
                self._seen = n
                self.completion_tokens += n - seen
        if done:
            text += self._held + self._utf8.decode(b"", final=True)
            self._held = ""
            self._end(req.finish_reason, req.message)
            return text, True
        return text, False

    def _bytes_of(self, ids) -> bytes:
        table = self.engine.token_bytes
        try:
            return b"".join([table[t] for t in ids])
        except IndexError:  # an id past the tokenizer's vocabulary: its error
            tok = self.engine.tokenizer
            return b"".join([tok.token_to_bytes(t) for t in ids])

    def _take_with_stops(self, toks: List[int], seen: int, n: int) -> Tuple[str, bool]:
        # token by token: a stop string ends the text (and the tokens counted) at the
        # token that completes it, as Model._run does
        parts = []
        held, stops, decode = self._held, self._stops, self._utf8.decode
        for k in range(seen, n):
            self._seen = k + 1
            self.completion_tokens += 1
            held += decode(self._bytes_of((toks[k],)))
            cut = _find_stop(held, stops)
            if cut is not None:
                parts.append(held[:cut])
                self._held = ""
                self.req.cancel()  # the engine would go on: the stop string is ours
                self._end("stop", "")
                return "".join(parts), True
            keep = _stop_prefix_len(held, stops)
            if keep < len(held):
                parts.append(held[: len(held) - keep])
                held = held[len(held) - keep:]
        self._held = held
        return "".join(parts), False

    def _end(self, finish: str, message: str) -> None:
        self.finish_reason = finish
        self.message = message
        self.req.on_event = None
        self.engine._ended(self)


async def follow_batches(gens: Sequence[Generation],
                         wake: asyncio.Event) -> AsyncIterator[List[Tuple[int, str, bool]]]:
    """Per wake, the (index, new text, ended) of every generation that produced, in index
    order (so a caller can write them at once); every generation's last item has
    ended=True. gens share `wake` (they were started with it)."""
    open_ = list(range(len(gens)))
    first = True  # tokens may have come before the wake was installed: poll once unwoken
    while open_:
        # Every token appended after a poll read req.tokens sets the wake later (the
        # pump's notify follows the append), and the wake is cleared before each poll:
        # so an unset wake means nothing new, and the poll can wait for it.
        if not first and not wake.is_set():
            await wake.wait()
        first = False
        wake.clear()
        batch = []
        for i in open_:
            text, ended = gens[i].poll()
            if text or ended:
                batch.append((i, text, ended))
        if not batch:
            continue
        if any(e for _, _, e in batch):
            open_ = [i for i in open_ if not gens[i].ended]
        yield batch


async def follow(gens: Sequence[Generation], wake: asyncio.Event) -> AsyncIterator[Tuple[int, str, bool]]:
    """(index, new text, ended) for each generation as it produces; every generation's
    last item has ended=True. gens share `wake` (they were started with it)."""
    async for batch in follow_batches(gens, wake):
        for item in batch:
            yield item
