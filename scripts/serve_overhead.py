"""Profiling tool (not a test): how many tokens per second the Python side of `orcd serve`
can deliver, and what it costs in CPU per token, with the C++ step loop replaced by a
synthetic token source.

What runs for real: orcd.server's aiohttp application (create_app), ServeEngine, the
BatchRunner and its pump thread, Generation.poll (detokenization, stop strings) and the
OpenAI / worker SSE handlers, over TCP on 127.0.0.1. What is fake: the native StepLoop
(FakeStepLoop below: its interface, with a virtual clock run by the pump thread's
take_events calls, so it needs no thread of its own), which every --step-ms gives one
token to every running sequence: the token ids of a real text (this repository's
docs/design.md plus some multi-byte UTF-8) encoded with the real model's tokenizer. The
clients run in a second process (aiohttp), N concurrent streams each sending requests one
after another for --seconds.

    python scripts/serve_overhead.py --streams 1 8 64 --api chat --step-ms 0.05
    python scripts/serve_overhead.py --streams 64 --api worker --profile /tmp/prof.txt

--step-ms: the fake engine's step time (one token per running sequence per step): the
step times `orcd bench-batch` measures on the GPU mimic a real load; small values (0.05)
saturate the Python side, so the delivered rate is its capacity (the wakes then carry
many tokens each). On a machine with few cores the client process may be the limit:
compare the CPU per token, which does not depend on it. Reported per run: delivered tokens/s (tokens in the streams' usage / end events over the
measured window), server CPU per delivered token (the whole process; the event loop
thread; the pump thread, which also builds the synthetic events as the native
take_events does; the other threads: the executor threads encoding the prompts), reads
(socket reads by the clients, about the server's writes) and bytes per token.
--check: the clients compare every stream's text with the tokenizer's decoding of the ids the fake engine sent (slower
clients; for correctness, not for numbers). --profile FILE: cProfile of the event loop
thread's run, the top functions by internal time written to FILE.<streams>.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import threading
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRA_TEXT = ("\nnaïve café — 東京の天気は晴れ。 Ünïcödé ✓ 😀🚀 (multi-byte UTF-8 split across tokens)\n")


# ---------------------------------------------------------------- the synthetic engine
class FakeStepLoop:
    """orcd._orcd.StepLoop's interface (what BatchRunner calls), with a virtual clock so
    that, like the C++ loop, it needs no Python thread of its own: take_events (the pump
    thread) runs every step that is due since its last call, each step admitting waiting
    requests into free slots and giving every running one its next token. Request with
    seed s generates TOKENS[(s * 7919 + k) % len(TOKENS)] for k = 0, 1, ... up to
    max_tokens ("length"); stop ids are ignored (the text has none)."""

    TOKENS: list = []
    N_VOCAB = 0
    STEP_S = 0.001
    MAX_STEPS_PER_TAKE = 10000

    def __init__(self, path, n_ctx, n_slots, n_threads, max_waiting, prefill_chunk, kv_memory=0):
        self.n_vocab = self.N_VOCAB
        self.n_slots = n_slots
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting: list = []     # [rid, pos, left]
        self._running: list = []
        self._cancel: set = set()
        self._t_next = 0.0           # when the next step is due
        self._stop = False
        self._closed = False
        self.steps = 0
        self.generated = 0

    def submit(self, rid, ids, max_tokens, stops, temperature, top_k, top_p, min_p, rep, pres, freq, last_n,
               seed, logprobs, prompt_logprobs, mask_fn=None, reuse_prefix=True):
        with self._lock:
            if self._stop:
                raise ValueError("the step loop is closed")
            if len(self._waiting) >= self.max_waiting + max(0, self.n_slots - len(self._running)):
                return False
            if not self._running and not self._waiting:  # idle: the first step starts now
                self._t_next = time.perf_counter() + self.STEP_S
            self._waiting.append([rid, (seed * 7919) % len(self.TOKENS), max_tokens])
        return True

    def cancel(self, rid) -> bool:
        with self._lock:
            self._cancel.add(rid)
        return True

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting), "steps": self.steps,
                "prompt_tokens": 0, "generated": self.generated, "finished": 0}

    def take_events(self, timeout_ms):
        deadline = time.perf_counter() + timeout_ms / 1000.0
        while True:
            with self._lock:
                if self._closed:
                    return None
                if self._stop:
                    out = [(r[0], -1, "cancelled", "the loop shut down") for r in self._running + self._waiting]
                    self._running, self._waiting, self._closed = [], [], True
                    return out
                now = time.perf_counter()
                busy = self._running or self._waiting
                if busy and now >= self._t_next:
                    n = min(int((now - self._t_next) / self.STEP_S) + 1, self.MAX_STEPS_PER_TAKE)
                    self._t_next += n * self.STEP_S
                    if self._t_next < now:
                        self._t_next = now + self.STEP_S
                    return self._steps(n)
                wait = (self._t_next if busy else deadline) - now
            if now >= deadline:
                return []
            time.sleep(min(max(wait, 0.0), deadline - now, 0.01))

    def _steps(self, n_steps: int) -> list:
        toks, n = self.TOKENS, len(self.TOKENS)
        out = []
        for _ in range(n_steps):
            while self._waiting and len(self._running) < self.n_slots:
                self._running.append(self._waiting.pop(0))
            if not self._running:
                break
            cancel, self._cancel = self._cancel, set()
            keep = []
            for r in self._running:
                if r[0] in cancel:
                    out.append((r[0], -1, "cancelled", ""))
                    continue
                r[2] -= 1
                fin = "length" if r[2] <= 0 else ""
                out.append((r[0], toks[r[1] % n], fin, ""))
                r[1] += 1
                if not fin:
                    keep.append(r)
            self._running = keep
            self.steps += 1
            self.generated += len(out)
        return out

    def shutdown(self):
        with self._lock:
            self._stop = True

    def close(self):
        self.shutdown()


def token_source(tokenizer) -> list:
    with open(os.path.join(REPO, "docs", "design.md"), encoding="utf-8") as f:
        text = f.read()
    return tokenizer.encode(text + EXTRA_TEXT * 8)


# ---------------------------------------------------------------- per-thread CPU
def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds of one live thread of this process."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- clients (second process)
def _body(api: str, seed: int, max_tokens: int, stop):
    if api == "chat":
        b = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": max_tokens,
             "seed": seed, "stream_options": {"include_usage": True}}
    elif api == "completion":
        b = {"prompt": "hi", "stream": True, "max_tokens": max_tokens, "seed": seed,
             "stream_options": {"include_usage": True}}
    else:
        b = {"job_id": f"job-{seed}", "prompt": "hi", "max_tokens": max_tokens, "seed": seed, "raw": True}
    if stop:
        b["stop"] = stop
    return b


def _texts_of(api: str, raw: bytes):
    """(text, tokens, events) of one finished stream; raises on a malformed one."""
    text, tokens, events = [], None, 0
    for block in raw.decode("utf-8").split("\n\n"):
        if not block:
            continue
        events += 1
        lines = block.split("\n")
        data = lines[-1][len("data: "):]
        if api == "worker":
            name = lines[0][len("event: "):]
            d = json.loads(data)
            if name == "token":
                text.append(d["t"])
            elif name == "end":
                tokens = d["tokens_out"]
            elif name == "error":
                raise RuntimeError(f"stream error: {d}")
        else:
            if data == "[DONE]":
                continue
            d = json.loads(data)
            if "error" in d:
                raise RuntimeError(f"stream error: {d}")
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            for c in d["choices"]:
                t = c["delta"].get("content") if api == "chat" else c["text"]
                if t:
                    text.append(t)
    return "".join(text), tokens, events


def _usage_tokens(api: str, tail: bytes) -> int:
    key = b'"tokens_out":' if api == "worker" else b'"completion_tokens":'
    i = tail.rfind(key)
    if i < 0:
        raise RuntimeError(f"no token count at the end of the stream: {tail[-300:]!r}")
    j = i + len(key)
    k = j
    while k < len(tail) and tail[k:k + 1].isdigit():
        k += 1
    return int(tail[j:k])


async def _clients(url: str, api: str, streams: int, seconds: float, max_tokens: int, stop, check_file):
    import aiohttp

    expect = None
    if check_file:
        with open(check_file) as f:
            expect = json.load(f)  # {"tokens": [...], "gguf": path}
        from orcd.gguf_file import GGUFFile
        from orcd.tokenizer import Tokenizer

        with GGUFFile(expect["gguf"]) as g:
            tok = Tokenizer.from_metadata(g.metadata)
    path = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "worker": "/execute"}[api]
    done = {"tokens": 0, "reads": 0, "requests": 0, "bytes": 0, "checked": 0}
    t_end = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def one(session):
        while time.monotonic() < t_end:
            seed = next(counter)
            buf = bytearray()
            reads = nbytes = 0
            async with session.post(url + path, json=_body(api, seed, max_tokens, stop)) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
                async for chunk in r.content.iter_any():
                    reads += 1
                    nbytes += len(chunk)
                    if expect is not None:
                        buf += chunk
                    else:
                        buf = buf[-400:] + chunk
            n = _usage_tokens(api, bytes(buf[-800:]))
            if expect is not None:
                text, n2, _ = _texts_of(api, bytes(buf))
                toks = expect["tokens"]
                start = (seed * 7919) % len(toks)
                ids = [toks[(start + k) % len(toks)] for k in range(n)]
                want = tok.decode(ids)
                if stop:
                    cut = min((want.find(s) for s in stop if s in want), default=-1)
                    if cut >= 0:
                        want = want[:cut]
                if text != want or n2 != n:
                    raise RuntimeError(f"seed {seed}: text mismatch\n got {text!r}\nwant {want!r}")
                done["checked"] += 1
            done["tokens"] += n
            done["reads"] += reads
            done["requests"] += 1
            done["bytes"] += nbytes

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.monotonic()
        await asyncio.gather(*(one(s) for _ in range(streams)))
        done["wall"] = time.monotonic() - t0
    return done


def _client_main(url, api, streams, seconds, max_tokens, stop, check_file, q):
    try:
        q.put(asyncio.run(_clients(url, api, streams, seconds, max_tokens, stop, check_file)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------- the server side
async def _measure(args, model_path: str) -> list:
    import orcd.batch as batch_mod
    from orcd.server.app import create_app
    from orcd.server.engine import ServeEngine
    from orcd.server.metrics import ServerMetrics
    from aiohttp import web

    batch_mod._orcd = types.SimpleNamespace(StepLoop=FakeStepLoop)  # the synthetic engine
    loop = asyncio.get_running_loop()
    results = []
    for streams in args.streams:
        metrics = ServerMetrics()
        eng = ServeEngine(model_path, device="cpu", n_ctx=4096, max_seqs=streams, max_queue=streams,
                          metrics=metrics)
        eng.attach(loop)
        FakeStepLoop.STEP_S = args.step_ms / 1000.0
        await loop.run_in_executor(None, eng.load)
        if not FakeStepLoop.TOKENS:
            raise RuntimeError("no tokens")
        app = create_app(eng, metrics)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        check_file = None
        if args.check:
            check_file = os.path.join(args.tmp, "serve_overhead_tokens.json")
            with open(check_file, "w") as f:
                json.dump({"tokens": FakeStepLoop.TOKENS, "gguf": model_path}, f)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_client_main, args=(f"http://127.0.0.1:{port}", args.api, streams, args.seconds,
                                                      args.max_tokens, args.stop, check_file, q))
        pump = eng.runner._pump
        loop_thread = threading.current_thread()
        c0 = (process_cpu(), thread_cpu(loop_thread), thread_cpu(pump))
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        proc.start()
        res = await loop.run_in_executor(None, q.get)
        if prof is not None:
            prof.disable()
        per_thread = {t.name: round(thread_cpu(t), 3) for t in threading.enumerate()}
        c1 = (process_cpu(), thread_cpu(loop_thread), thread_cpu(pump))
        proc.join(10)
        await runner.cleanup()
        await loop.run_in_executor(None, eng.close)
        if "error" in res:
            raise RuntimeError(f"clients failed: {res['error']}")
        n = max(res["tokens"], 1)
        us = [round((b - a) * 1e6 / n, 2) for a, b in zip(c0, c1)]
        row = {"streams": streams, "api": args.api, "step_ms": args.step_ms, "tokens": res["tokens"],
               "requests": res["requests"], "tok_s": round(res["tokens"] / res["wall"], 1),
               "cpu_us_per_tok": us[0], "loop_us": us[1], "pump_us": us[2],
               "other_threads_us": round(us[0] - us[1] - us[2], 2),
               "reads_per_tok": round(res["reads"] / n, 3), "bytes_per_tok": round(res["bytes"] / n, 1)}
        if args.verbose:
            row["cpu_s"] = [c0, c1, per_thread]
        if args.check:
            row["checked_streams"] = res["checked"]
        results.append(row)
        print(json.dumps(row), flush=True)
        if prof is not None:
            import pstats

            with open(args.profile + f".{streams}", "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--api", choices=("chat", "completion", "worker"), default="chat")
    ap.add_argument("--step-ms", type=float, default=0.05)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--stop", nargs="*", default=None, help="stop strings sent with every request")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--model", default=None, help="a GGUF (its tokenizer); default: orcd's default model")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tmp", default="/tmp")
    args = ap.parse_args(argv)
    from orcd.default_model import resolve_model
    from orcd.gguf_file import GGUFFile
    from orcd.tokenizer import Tokenizer

    path = resolve_model(args.model)
    with GGUFFile(path) as g:
        tok = Tokenizer.from_metadata(g.metadata)
        FakeStepLoop.N_VOCAB = tok.n_vocab
    FakeStepLoop.TOKENS = token_source(tok)
    asyncio.run(_measure(args, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
