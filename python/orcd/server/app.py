"""`orcd serve`: the aiohttp application (routes, authentication, health, metrics) and its
lifecycle (load in the background, serve, drain on SIGTERM / SIGINT).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}]
(openai_api.py); POST /execute, POST /cancel (worker_api.py); GET /health, GET /metrics.
With an API key, /v1/*, /execute and /cancel need `Authorization: Bearer KEY` (401
otherwise); /health and /metrics stay open.

Lifecycle: the port opens at once; the model loads in a background thread (/health says
"loading" with HTTP 503, inference answers 503). On SIGTERM or SIGINT: new requests get
503; requests in flight may finish for up to `grace` seconds; then every remaining
generation is ended (worker streams get error CANCELLED, OpenAI streams an error event
and [DONE]), the handlers get up to DRAIN_WRITE_SECONDS to write those, the server
closes and serve() returns 0. A second signal skips the rest of the grace period.
serve() returns 1 when the model fails to load.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import sys
import time
from typing import Optional

import aiohttp
from aiohttp import web

from ..sizes import parse_bytes
from . import openai_api, worker_api
from .engine import ServeEngine
from .errors import ApiError, openai_response, worker_response
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .state import MAX_BODY_BYTES, STATE, ServerState

DRAIN_WRITE_SECONDS = 5.0
log = logging.getLogger("orcd.server")

_AIOHTTP = tuple(int(x) for x in aiohttp.__version__.split(".")[:2])


def _is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def _error_response(path: str, e: ApiError) -> web.Response:
    return openai_response(e) if _is_openai(path) else worker_response(e)


def _allow(e: web.HTTPException) -> dict:
    allow = e.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _make_middlewares(st: ServerState):
    @web.middleware
    async def track(request: web.Request, handler):
        # counts requests in progress, so a drain knows when every handler has finished
        st.active += 1
        st.idle.clear()
        try:
            return await handler(request)
        finally:
            st.active -= 1
            if st.active == 0:
                st.idle.set()

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _error_response(request.path, ApiError(e.status, f"{request.method} {request.path}: {e.reason}",
                                                          code="http_error", headers=_allow(e)))
        except ApiError as e:
            return _error_response(request.path, e)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("internal error on %s %s", request.method, request.path)
            return _error_response(request.path, ApiError(500, f"internal error: {type(e).__name__}: {e}",
                                                          code="internal_error"))

    @web.middleware
    async def auth(request: web.Request, handler):
        if st.api_key and (_is_openai(request.path) or request.path in ("/execute", "/cancel")):
            header = request.headers.get("Authorization", "")
            token = header[7:] if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.strip().encode(), st.api_key.encode()):
                what = "missing" if not header else "incorrect"
                raise ApiError(401, f"{what} API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return [track, errors, auth]


def _runtime_version(v) -> Optional[str]:
    try:
        v = int(v)
    except (TypeError, ValueError):
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


async def health(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    eng = st.engine
    status = {"loading": "loading", "ready": "ok", "failed": "error", "closed": "draining"}[eng.state]
    if st.draining:
        status = "draining"
    ready = eng.state == "ready"
    cuda = eng.cuda_device() if ready else None
    body = {
        "status": status,
        "model": eng.model_id,
        "resident": ready,
        "device": eng.device,
        "quant_kind": eng.quant_kind() if ready else None,
        "vram_bytes_used": (int(cuda["total_memory"]) - int(cuda["free_memory"])) if cuda else None,
        "tokenizer_kind": eng.tokenizer_kind() if ready else None,
        "vocab_size": eng.runner.n_vocab if ready else None,
        "context_length": eng.n_ctx,
        "max_seqs": eng.max_seqs,
        # the KV pool the sequences share (cpp/kv_pool.h), in positions
        "kv_pool_positions": eng.stats().get("kv_positions") if ready else None,
        "kv_pool_reserved": eng.stats().get("kv_reserved") if ready else None,
        "uptime_seconds": round(time.monotonic() - st.started, 3),
        "sm": ("sm_" + str(cuda["compute_capability"]).replace(".", "")) if cuda else None,
        "cuda_runtime_version": _runtime_version(cuda.get("runtime_version")) if cuda else None,
    }
    if eng.error:
        body["error"] = eng.error
    return web.json_response(body, status=200 if status == "ok" else 503)


async def metrics(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    return web.Response(body=st.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(engine: ServeEngine, metrics_: ServerMetrics, api_key: Optional[str] = None) -> web.Application:
    st = ServerState(engine, metrics_, api_key)
    app = web.Application(middlewares=_make_middlewares(st), client_max_size=MAX_BODY_BYTES)
    app[STATE] = st
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_get("/v1/models", openai_api.models)
    app.router.add_get("/v1/models/{model}", openai_api.models)
    app.router.add_post("/execute", worker_api.execute)
    app.router.add_post("/cancel", worker_api.cancel)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(model: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                max_seqs: int = 64, n_ctx: int = 4096, max_queue: int = 256, api_key: Optional[str] = None,
                grace: float = 10.0, n_threads: int = 0, prefill_chunk: int = 512,
                load_delay: float = 0.0, kv_memory=None) -> int:
    """Runs the server until SIGTERM / SIGINT; returns the exit code (0, or 1 when the
    model fails to load). load_delay: seconds to wait before loading (tests observe the
    "loading" state with it)."""
    for name, v, lo in (("max_seqs", max_seqs, 1), ("n_ctx", n_ctx, 2), ("max_queue", max_queue, 0),
                        ("prefill_chunk", prefill_chunk, 1), ("threads", n_threads, 0), ("port", port, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {lo} (got {v!r})")
    if port > 65535:
        raise ValueError(f"--port must be at most 65535 (got {port})")
    if not grace >= 0:
        raise ValueError(f"--grace must be >= 0 seconds (got {grace!r})")
    kv_memory = parse_bytes(kv_memory, "--kv-memory")
    loop = asyncio.get_running_loop()
    metrics_ = ServerMetrics()
    engine = ServeEngine(model, device=device, n_ctx=n_ctx, max_seqs=max_seqs, max_queue=max_queue,
                         n_threads=n_threads, prefill_chunk=prefill_chunk, metrics=metrics_, kv_memory=kv_memory)
    engine.attach(loop)
    app = create_app(engine, metrics_, api_key)
    st: ServerState = app[STATE]
    kw = {"handler_cancellation": True} if _AIOHTTP >= (3, 9) else {}  # 3.8 always cancels
    runner = web.AppRunner(app, access_log=None, **kw)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    _say(f"listening on http://{host}:{port} (loading {model or 'the default model'})")

    stop = asyncio.Event()
    signals = {"n": 0}

    def on_signal(signame: str):
        signals["n"] += 1
        _say(f"{signame}: shutting down" + (" now" if signals["n"] > 1 else f" (grace {grace:g} s)"))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)

    async def load():
        if load_delay > 0:
            await asyncio.sleep(load_delay)
        await loop.run_in_executor(None, engine.load)

    load_task = asyncio.ensure_future(load())
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait([load_task, stop_task], return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    if load_task.done() and load_task.exception() is not None:
        _say(f"error: could not load the model: {engine.error or load_task.exception()}")
        rc = 1
    elif load_task.done():
        _say(f"ready: {engine.model_id} on {engine.device}, n_ctx={n_ctx}, max_seqs={max_seqs}")
        await stop_task
    stop_task.cancel()

    st.draining = True
    deadline = loop.time() + grace
    while st.active and signals["n"] < 2 and loop.time() < deadline:
        try:
            await asyncio.wait_for(st.idle.wait(), timeout=min(0.1, max(0.0, deadline - loop.time())))
        except asyncio.TimeoutError:
            pass
    for job in list(st.jobs.values()):
        job.cancel("the server is shutting down")
    for g in list(engine.live):
        g.cancel("the server is shutting down")
    try:
        await asyncio.wait_for(st.idle.wait(), timeout=DRAIN_WRITE_SECONDS)
    except asyncio.TimeoutError:
        _say(f"{st.active} request(s) still open after {DRAIN_WRITE_SECONDS:g} s: closing them")
    # the handlers are done, but what they wrote beyond the kernel's socket buffers (a client
    # reading slowly) is still in this process; closing a transport keeps sending it while the
    # loop runs, so wait for that before the event loop's end would cut those streams short
    server = getattr(runner, "server", None)
    transports = [c.transport for c in getattr(server, "connections", ()) if getattr(c, "transport", None)]
    await runner.cleanup()
    await _flush_writes(transports, DRAIN_WRITE_SECONDS)
    if not load_task.done():  # a signal during loading: let the load end, then free it
        try:
            await load_task
        except Exception:  # noqa: BLE001
            pass
    await loop.run_in_executor(None, engine.close)
    _say("stopped")
    return rc


async def _flush_writes(transports, timeout: float) -> None:
    """Waits, at most `timeout` seconds, until these transports hold no unsent bytes."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end and any(t.get_write_buffer_size() for t in transports):
        await asyncio.sleep(0.01)


def _say(msg: str) -> None:
    print(f"orcd serve: {msg}", file=sys.stderr, flush=True)


def run(**kwargs) -> int:
    """serve(**kwargs) in a fresh event loop."""
    return asyncio.run(serve(**kwargs))
