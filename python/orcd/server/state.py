"""What every handler of one server shares: the engine, the metrics, the draining flag,
the live worker jobs, and the steps each request starts with (readiness, the JSON body,
the model name, prompt encoding off the event loop)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Callable, Dict, Optional

from aiohttp import web

from .engine import ContextOverflow, ServeEngine
from .errors import ApiError, unavailable
from .metrics import ServerMetrics

# Requests larger than this are refused (413) before they are parsed.
MAX_BODY_BYTES = 32 << 20

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class ServerState:
    def __init__(self, engine: ServeEngine, metrics: ServerMetrics, api_key: Optional[str] = None):
        self.engine = engine
        self.metrics = metrics
        self.api_key = api_key
        self.draining = False
        self.started = time.monotonic()
        self.jobs: Dict[str, object] = {}   # worker API: live job_id -> Job
        self.active = 0                     # requests being handled
        self.idle = asyncio.Event()         # set while active == 0
        self.idle.set()

    def check_ready(self) -> None:
        """ApiError 503 while the model loads or the server drains."""
        if self.draining:
            raise unavailable("the server is shutting down")
        st = self.engine.state
        if st == "loading":
            raise unavailable("the model is still loading")
        if st != "ready":
            raise unavailable(f"the model is not available ({st}{': ' + self.engine.error if self.engine.error else ''})")

    def check_model(self, name: Optional[str]) -> None:
        """ApiError 404 unless name is None or names the served model."""
        eng = self.engine
        if name is None or name == "" or name in (eng.model_id, eng.model_arg, eng.path):
            return
        raise ApiError(404, f"the model {name!r} does not exist (this server serves {eng.model_id!r})",
                       param="model", code="model_not_found")

    async def read_json(self, request: web.Request):
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES:,} bytes",
                           code="request_too_large") from None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    async def encode(self, fn: Callable, *args, param: str, overflow_code: str = "context_length_exceeded"):
        """fn(*args) (a tokenization) in a worker thread; ContextOverflow -> 400 with
        overflow_code, other ValueError / TypeError -> 400 naming param."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except ContextOverflow as e:
            raise ApiError(400, str(e), param=param, code=overflow_code) from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param=param, code="invalid_value") from None


# The application key of the ServerState (web.AppKey where aiohttp has it, 3.9+).
STATE = web.AppKey("orcd", ServerState) if hasattr(web, "AppKey") else "orcd"
