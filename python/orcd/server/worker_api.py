"""The worker API (the original GPU worker's contract): POST /execute and POST /cancel.

POST /execute {job_id, prompt, max_tokens, temperature, top_p, top_k, min_p,
repetition_penalty, stop, seed, raw, ignore_eos} -> server-sent events:

    event: started  data: {"job_id", "model", "started_at"}        started_at: ISO 8601, UTC
    event: token    data: {"t": text, "i": n}                      n = 0, 1, 2, ... per piece
    ...
    event: end      data: {"tokens_out", "decode_time_ms", "finish_reason", "prompt_tokens", "ttft_ms"}
 or event: error    data: {"code", "message"}   CANCELLED, CONTEXT_OVERFLOW, VRAM_OOM, INTERNAL

Exactly one terminal event (end or error) per stream. A piece is the text of one or more
tokens, never a partial UTF-8 character, never text that might begin a stop string
(held until it is known not to). decode_time_ms: from submission to the last token.
Sampling defaults are orcd's (SamplingParams). The prompt is a user message rendered with
the model's chat template when the model has one (instruct models answer nothing useful
to a bare instruction); "raw": true sends it as it is. Validation failures (400, code
INVALID_REQUEST or CONTEXT_OVERFLOW), a duplicate live job_id (409), a full queue (429)
and loading / draining (503) are answered before any stream starts.

POST /cancel {job_id} -> 202 {"job_id", "status": "cancelling" | "unknown"}, idempotent:
the job's stream ends at once with error CANCELLED; the engine frees its slot at its next
step. A client that disconnects from /execute cancels its job the same way.
"""
from __future__ import annotations

import asyncio
import datetime
import time
from typing import Optional

from aiohttp import web

from .. import openai_format as fmt
from ..types import SamplingParams
from .engine import Busy, Unavailable, follow_batches
from .errors import ApiError, busy, unavailable, worker_response
from .openai_params import boolean, integer, number, parse_seed, parse_stop
from .state import SSE_HEADERS, STATE, ServerState

MAX_JOB_ID_CHARS = 256


class Job:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.gen = None
        self.cancelled = ""   # why, once cancelled

    def cancel(self, message: str = "cancelled by POST /cancel") -> None:
        self.cancelled = message
        if self.gen is not None:
            self.gen.cancel(message)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="INVALID_REQUEST")


def _job_id(body) -> str:
    if not isinstance(body, dict):
        raise _bad("", "the request body must be a JSON object")
    jid = body.get("job_id")
    if not isinstance(jid, str) or not jid or len(jid) > MAX_JOB_ID_CHARS:
        raise _bad("job_id", f"job_id must be a string of 1 to {MAX_JOB_ID_CHARS} characters (got {jid!r})")
    return jid


def parse_execute(body) -> tuple:
    """(job_id, prompt, raw, SamplingParams, cache_prompt); ApiError 400 INVALID_REQUEST naming
    the field."""
    jid = _job_id(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "prompt must be a non-empty string")
    d = SamplingParams()
    try:
        params = SamplingParams(
            max_tokens=integer(body, "max_tokens", d.max_tokens, 1),
            temperature=number(body, "temperature", d.temperature, 0.0, 2.0),
            top_p=number(body, "top_p", d.top_p, 0.0, 1.0, lo_open=True),
            top_k=integer(body, "top_k", d.top_k, 0),
            min_p=number(body, "min_p", d.min_p, 0.0, 1.0),
            repetition_penalty=number(body, "repetition_penalty", d.repetition_penalty, 0.0, 10.0, lo_open=True),
            seed=parse_seed(body.get("seed")),
            stop=parse_stop(body.get("stop")),
            ignore_eos=boolean(body, "ignore_eos", False),
        )
        raw = boolean(body, "raw", False)
        cache_prompt = boolean(body, "cache_prompt", True)
    except ApiError as e:
        raise _bad(e.param, e.message) from None
    return jid, prompt, raw, params, cache_prompt


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _token_event(text: str, i: int) -> bytes:
    """fmt.sse_event("token", {"t": text, "i": i}), encoded without a dict (once per piece)."""
    return (b'event: token\ndata: {"t":' + fmt.json_string(text)
            + b',"i":' + str(i).encode("ascii") + b"}\n\n")


def _terminal(gen) -> tuple:
    if gen.finish_reason in ("stop", "length"):
        t_end = gen.t_last if gen.t_last is not None else time.monotonic()
        return "end", {"tokens_out": gen.completion_tokens,
                       "decode_time_ms": round((t_end - gen.t_arrival) * 1000.0, 3),
                       "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                       "ttft_ms": None if gen.t_first is None else round((gen.t_first - gen.t_arrival) * 1000.0, 3)}
    if gen.finish_reason == "cancelled":
        return "error", {"code": "CANCELLED", "message": gen.message or "cancelled"}
    msg = gen.message or "the engine failed"
    code = "VRAM_OOM" if "out of memory" in msg.lower() else "INTERNAL"
    return "error", {"code": code, "message": msg}


async def execute(request: web.Request) -> web.StreamResponse:
    st: ServerState = request.app[STATE]
    t0 = time.monotonic()
    job: Optional[Job] = None
    try:
        st.check_ready()
        jid, prompt, raw, params, cache_prompt = parse_execute(await st.read_json(request))
        if jid in st.jobs:
            raise ApiError(409, f"job_id {jid!r} is already running", param="job_id", code="DUPLICATE_JOB")
        job = Job(jid)
        st.jobs[jid] = job
        eng = st.engine
        if raw or not eng.has_chat_template:
            ids = await st.encode(eng.encode_prompt, prompt, param="prompt", overflow_code="CONTEXT_OVERFLOW")
        else:
            ids = await st.encode(eng.encode_chat, [{"role": "user", "content": prompt}], param="prompt",
                                  overflow_code="CONTEXT_OVERFLOW")
        st.check_ready()
        wake = asyncio.Event()
        try:
            gen = eng.start(ids, params, wake, t0, cache_prompt=cache_prompt)
        except Busy:
            raise busy() from None
        except Unavailable as e:
            raise unavailable(str(e)) from None
        except (ValueError, TypeError) as e:
            raise _bad("", str(e)) from None
    except ApiError as e:
        if job is not None and st.jobs.get(job.job_id) is job:
            del st.jobs[job.job_id]
        st.metrics.outcome("rejected")
        return worker_response(e)
    except BaseException:
        if job is not None and st.jobs.get(job.job_id) is job:
            del st.jobs[job.job_id]
        raise
    job.gen = gen
    if job.cancelled:  # cancelled while the prompt was being encoded
        gen.cancel(job.cancelled)
    try:
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        await resp.write(fmt.sse_event("started", {"job_id": jid, "model": eng.model_id, "started_at": _now_iso()}))
        i = 0
        async for batch in follow_batches([gen], wake):  # one write per wake
            _, text, ended = batch[0]
            piece = _token_event(text, i) if text else b""
            i += bool(text)
            if ended:  # the last piece, the terminal event and the body's end in one write,
                # flushed before the handler ends (see openai_api._stream)
                await resp.write_eof(piece + fmt.sse_event(*_terminal(gen)))
                break
            await resp.write(piece)
        await resp.write_eof()  # a no-op after the terminal write
        return resp
    except ConnectionError:  # the client went away while we wrote
        return resp
    finally:
        gen.cancel("the client went away")  # no-op when it ended
        if st.jobs.get(jid) is job:
            del st.jobs[jid]


async def cancel(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    try:
        jid = _job_id(await st.read_json(request))
    except ApiError as e:
        return worker_response(e)
    job = st.jobs.get(jid)
    if job is not None:
        job.cancel()
    return web.json_response({"job_id": jid, "status": "cancelling" if job is not None else "unknown"}, status=202)
