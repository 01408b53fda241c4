"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models (and /v1/models/{id}).

A request is parsed (openai_params), its prompts encoded off the event loop, then its
n choices (per prompt) submitted to the engine at once; they run in the same batch.
Non-streamed: one JSON response with every choice, usage and finish_reason. Streamed:
`data: {chunk}` events (a chat choice starts with a role-only delta and ends with an
empty delta carrying its finish_reason), the usage chunk with stream_options.include_usage,
then `data: [DONE]`. A choice that ends otherwise (the server shutting down, an engine
error) ends the stream with `data: {"error": {...}}` and `data: [DONE]` (the openai
client raises APIError). Choice index: prompt index * n + i; choice i is seeded seed + i.
A client that disconnects cancels its generations (their slots are freed).

Logprobs (openai_params: chat logprobs/top_logprobs, completions logprobs/echo) ride on the
same batched path: the step loop reports each token's (and, for echo, each prompt token's)
logprobs with its events (raw distribution, before penalties / temperature / top-k/p). A
streamed chunk carries the logprobs of the tokens consumed since the previous one; with
echo a choice's first chunk is its prompt (and the prompt's logprobs).

Structured output and tools (orcd.structured, orcd.tools): the grammar is compiled and each
choice's matcher made off the event loop; a chat request with tools (tool_choice not "none")
has its answers parsed into message.tool_calls (finish_reason "tool_calls"); streamed, the
text before the first <tool_call> comes as content deltas and the calls as one tool_calls
delta at the end of the choice.
"""
from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from .. import openai_format as fmt
from .engine import Busy, Unavailable, follow, follow_batches
from .errors import ApiError, busy, openai_response, unavailable
from .openai_params import OpenAIRequest, parse
from .state import SSE_HEADERS, STATE, ServerState

_CONSTRAINT_FIELDS = ("response_format", "regex", "grammar", "tools", "tool_choice")



def _state(request: web.Request) -> ServerState:
    return request.app[STATE]


async def models(request: web.Request) -> web.Response:
    st = _state(request)
    try:
        st.check_ready()
    except ApiError as e:
        return openai_response(e)
    card = fmt.model_card(st.engine.model_id, st.engine.created)
    mid = request.match_info.get("model")
    if mid is None:
        return web.json_response(fmt.model_list([card]))
    try:
        st.check_model(mid)
    except ApiError as e:
        return openai_response(e)
    return web.json_response(card)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "completion")


async def _prepare(st: ServerState, request: web.Request, kind: str, t0: float):
    """Parses, encodes and submits: (OpenAIRequest, prompt token ids, gens, wake)."""
    st.check_ready()
    req = parse(await st.read_json(request), kind)
    st.check_model(req.model)
    eng = st.engine
    n_choices = req.n * (1 if kind == "chat" else len(req.prompts))
    masks = await _constraints(req, eng, n_choices) if req.constrained else [None] * n_choices
    if kind == "chat":
        tools = req.tools if req.tool_mode != "none" else None
        prompt_ids = [await st.encode(eng.encode_chat, req.messages, tools, param="messages")]
    else:
        prompt_ids = []
        for p in req.prompts:
            fn = eng.encode_prompt if isinstance(p, str) else eng.check_ids
            prompt_ids.append(await st.encode(fn, p, param="prompt"))
    st.check_ready()  # the server may have begun draining meanwhile
    wake = asyncio.Event()
    gens = []
    try:
        for ids in prompt_ids:
            for i in range(req.n):
                gens.append(eng.start(ids, req.params_for(i), wake, t0, mask_fn=masks[len(gens)],
                                          cache_prompt=req.cache_prompt))
    except BaseException as e:
        for g in gens:
            g.cancel()
        if isinstance(e, Busy):
            raise busy() from None
        if isinstance(e, Unavailable):
            raise unavailable(str(e)) from None
        if isinstance(e, (ValueError, TypeError)):
            raise ApiError(400, str(e), code="invalid_value") from None
        raise
    return req, prompt_ids, gens, wake


async def _handle(request: web.Request, kind: str) -> web.StreamResponse:
    st = _state(request)
    t0 = time.monotonic()
    try:
        req, prompt_ids, gens, wake = await _prepare(st, request, kind, t0)
    except ApiError as e:
        st.metrics.outcome("rejected")
        return openai_response(e)
    usage_prompt = sum(len(ids) for ids in prompt_ids)
    lp = _Logprobs(st, req, prompt_ids, gens)
    try:
        if req.stream:
            return await _stream(request, st, req, gens, wake, usage_prompt, lp)
        return await _whole(st, req, gens, wake, usage_prompt, lp)
    finally:
        for g in gens:  # a client gone (handler cancelled) or an error: free the slots
            g.cancel("the request ended early")


async def _constraints(req: OpenAIRequest, eng, n: int) -> list:
    """One structured-output matcher per choice (or Nones), made in a worker thread (the
    first use builds the llguidance tokenizer: seconds); sets req.tool_mode. A bad
    constraint is a 400 naming its field."""
    def make():
        from ..structured import plan_request

        spec, mode = plan_request(eng.tokenizer, eng.runner.n_vocab, req.response_format, req.regex,
                                  req.grammar, req.tools, req.tool_choice)
        if spec is not None and req.params.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured output (the grammar ends with EOS)")
        return mode, [spec.new_constraint() if spec is not None else None for _ in range(n)]

    try:
        req.tool_mode, masks = await asyncio.get_running_loop().run_in_executor(None, make)
    except ValueError as e:
        msg = str(e)
        field = next((f for f in _CONSTRAINT_FIELDS + ("ignore_eos",) if msg.startswith(f)), None)
        raise ApiError(400, msg, param=field, code="invalid_value") from None
    return masks


def _tool_names(req: OpenAIRequest):
    """The tool names whose calls are parsed from the answers, or None (no tool parsing)."""
    if req.kind != "chat" or req.tool_mode == "none":
        return None
    return [t["function"]["name"] for t in req.tools or ()]


def _ended_badly(gen) -> ApiError:
    if gen.finish_reason == "cancelled":
        return ApiError(503, f"the generation was cancelled: {gen.message}", code="cancelled")
    return ApiError(500, f"the engine failed: {gen.message}", code="engine_error")


class _Logprobs:
    """A request's logprobs and echo, per choice (choice i answers prompt i // n)."""

    def __init__(self, st: ServerState, req: OpenAIRequest, prompt_ids, gens):
        self.tok = st.engine.tokenizer
        self.chat = req.kind == "chat"
        self.on = req.params.logprobs is not None
        self.echo = req.echo
        self.prompt_ids = [prompt_ids[i // req.n] for i in range(len(gens))]
        self.prompt_text = []
        if self.echo:
            for i in range(len(gens)):
                p = req.prompts[i // req.n]
                self.prompt_text.append(p if isinstance(p, str) else self.tok.decode(p))
        self.gens = gens
        self.fmt = [fmt.CompletionLogprobs(self.tok) for _ in gens]
        self.echoed = [False] * len(gens)

    def prompt(self, i: int):
        """(prompt text, its logprobs object or None) for choice i's echo."""
        self.echoed[i] = True
        plp = self.gens[i].prompt_logprobs
        lp = None if not self.on or plp is None else self.fmt[i](self.prompt_ids[i], plp)
        return self.prompt_text[i], lp

    def new(self, i: int):
        """The logprobs object of choice i's tokens since the last call, or None."""
        if not self.on:
            return None
        lps = self.gens[i].take_logprobs()
        if not lps:
            return None
        if self.chat:
            return fmt.chat_logprobs(self.tok, lps)
        return self.fmt[i]([e.token_id for e in lps], lps)


def _merge_completion_logprobs(parts) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        if p:
            for k in out:
                out[k] += p[k]
    return out


async def _whole(st: ServerState, req: OpenAIRequest, gens, wake, usage_prompt: int, lp: _Logprobs) -> web.Response:
    texts = [[] for _ in gens]
    async for i, text, _ in follow(gens, wake):
        if text:
            texts[i].append(text)
    for g in gens:
        if g.finish_reason not in ("stop", "length"):
            return openai_response(_ended_badly(g))
    rid = fmt.new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    choices = []
    for i, (t, g) in enumerate(zip(texts, gens)):
        text, lps = "".join(t), None
        if lp.chat:
            lps = lp.new(i) if lp.on else None
            if lp.on and lps is None:
                lps = fmt.chat_logprobs(lp.tok, [])
        else:
            head, head_lp = lp.prompt(i) if lp.echo else ("", None)
            text = head + text
            if lp.on:
                lps = _merge_completion_logprobs([head_lp, lp.new(i)])
        choices.append((text, g.finish_reason, lps))
    usage = fmt.usage(usage_prompt, sum(g.completion_tokens for g in gens))
    names = _tool_names(req)
    if names is not None:
        from ..tools import parse_tool_calls

        calls = []
        for k, (text, finish, lps) in enumerate(choices):
            content, cs = parse_tool_calls(text, names)
            calls.append(cs or None)
            if cs:
                choices[k] = (content, "tool_calls", lps)
        return web.json_response(fmt.chat_completion(rid, fmt.now(), st.engine.model_id, choices, usage,
                                                     tool_calls=calls), dumps=_dumps)
    build = fmt.chat_completion if req.kind == "chat" else fmt.completion
    return web.json_response(build(rid, fmt.now(), st.engine.model_id, choices, usage),
                             dumps=_dumps)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def _stream(request: web.Request, st: ServerState, req: OpenAIRequest, gens, wake,
                  usage_prompt: int, lp: _Logprobs) -> web.StreamResponse:
    # Everything one wake produced (every choice's chunks; at the end the finish chunks,
    # the usage chunk, [DONE] and the end of the chunked body) goes out in one write.
    rid = fmt.new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    created, model = fmt.now(), st.engine.model_id
    chat = req.kind == "chat"
    u = req.include_usage
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        if chat:
            await resp.write(b"".join(fmt.sse_data(fmt.chat_chunk(rid, created, model, i, content="",
                                                                  role="assistant", with_usage_field=u))
                                      for i in range(len(gens))))
        mark = fmt.TextEvents.MARK
        text_events = [fmt.TextEvents(fmt.chat_chunk(rid, created, model, i, content=mark, with_usage_field=u)
                                      if chat else
                                      fmt.completion_chunk(rid, created, model, i, mark, with_usage_field=u))
                       for i in range(len(gens))]
        names = _tool_names(req)
        if names is not None:
            from ..tools import ToolCallStream

            calls_streams = [ToolCallStream(names) for _ in gens]
        n_open = len(gens)
        out = []
        async for batch in follow_batches(gens, wake):
            for i, text, ended in batch:
                if lp.echo and not lp.echoed[i]:
                    head, head_lp = lp.prompt(i)
                    out.append(fmt.sse_data(fmt.completion_chunk(rid, created, model, i, head, with_usage_field=u,
                                                                 logprobs=head_lp)))
                finish = gens[i].finish_reason
                calls = None
                if names is not None:
                    text = calls_streams[i].feed(text)
                    if ended and finish in ("stop", "length"):
                        rest, calls = calls_streams[i].finish()
                        text += rest
                        if calls:
                            finish = "tool_calls"
                # a chunk carries its tokens' logprobs even when the tool-call parser holds their text
                lps = lp.new(i)
                if lps is not None:
                    out.append(fmt.sse_data(
                        fmt.chat_chunk(rid, created, model, i, content=text, with_usage_field=u, logprobs=lps)
                        if chat else
                        fmt.completion_chunk(rid, created, model, i, text, with_usage_field=u, logprobs=lps)))
                elif text:
                    out.append(text_events[i](text))
                if calls:
                    out.append(fmt.sse_data(fmt.chat_chunk(rid, created, model, i, tool_calls=calls,
                                                           with_usage_field=u)))
                if not ended:
                    continue
                n_open -= 1
                g = gens[i]
                if g.finish_reason not in ("stop", "length"):
                    for other in gens:
                        other.cancel("another choice of the request ended")
                    e = _ended_badly(g)
                    out.append(fmt.sse_data(fmt.error(e.message, "server_error", None, e.code)))
                    out.append(fmt.SSE_DONE)
                    await resp.write_eof(b"".join(out))
                    return resp
                out.append(fmt.sse_data(
                    fmt.chat_chunk(rid, created, model, i, finish_reason=finish, with_usage_field=u) if chat
                    else fmt.completion_chunk(rid, created, model, i, "", g.finish_reason, with_usage_field=u)))
            if out and n_open:
                await resp.write(b"".join(out))
                out = []
        if u:
            usage = fmt.usage(usage_prompt, sum(g.completion_tokens for g in gens))
            build = fmt.chat_usage_chunk if chat else fmt.completion_usage_chunk
            out.append(fmt.sse_data(build(rid, created, model, usage)))
        out.append(fmt.SSE_DONE)
        # flushed here, inside the handler: a drain waits for the handlers, and the
        # connections close after it (aiohttp's own write_eof would run after the handler)
        await resp.write_eof(b"".join(out))
    except ConnectionError:  # the client went away while we wrote
        pass
    return resp
