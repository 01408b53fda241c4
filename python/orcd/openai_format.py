"""OpenAI's response shapes as plain dicts: completions, chat completions, their stream
chunks, usage, the model list and errors. One place for them, so the HTTP server
(orcd serve) and a Python API that returns OpenAI-shaped results never drift apart.

Only the standard library; nothing here knows about engines or HTTP. The shapes follow
OpenAI's API reference (the fields its official client reads): every choice carries
"logprobs" (None unless asked for) and finish_reason "stop" / "length" / "tool_calls"
(None in chunks until the choice ends).

Logprobs (built here from orcd.types.TokenLogprobs-like entries: .token_id, .logprob,
.top = [(id, logprob)], and a tokenizer with token_to_bytes): the model's raw distribution
(log_softmax of the logits before penalties, temperature, top-k/p and masks, as vLLM).
A token's "bytes" are its raw bytes (a byte-level BPE token may hold part of a UTF-8
character); its "token" text is those bytes decoded with U+FFFD for the incomplete part.
Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
"refusal": None}. Completions: {tokens, token_logprobs, top_logprobs: [{text: logprob}]
(the top N and the chosen token, so up to N+1 keys; None for an echoed first prompt
token), text_offset (character offsets into the choice's text, running across a stream)}.
-inf (a token the model rules out) is written as -9999.0: JSON has no infinity.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterable, List, Optional, Sequence, Tuple

SYSTEM_FINGERPRINT = "fp_orcd"


def new_id(prefix: str) -> str:
    """A fresh response id: "chatcmpl-..." / "cmpl-..."."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The "created" field: Unix seconds."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


# ---------------------------------------------------------------- chat completions
def _choice_logprobs(c: tuple):
    return c[2] if len(c) > 2 else None


def chat_completion(rid: str, created: int, model: str, choices: Sequence[tuple], usage_: dict,
                    tool_calls: Optional[Sequence[Optional[list]]] = None) -> dict:
    """A whole chat completion. choices: (text, finish_reason) or (text, finish_reason,
    chat_logprobs(...) or None) in index order. tool_calls: per choice, None or its calls
    (tool_call dicts); a choice with calls has them in its message (and its text, None when
    empty, as the content)."""
    out = {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c[0]},
                     "logprobs": _choice_logprobs(c), "finish_reason": c[1]}
                    for i, c in enumerate(choices)],
        "usage": usage_,
    }
    for ch, calls in zip(out["choices"], tool_calls or ()):
        if calls:
            ch["message"]["tool_calls"] = list(calls)
    return out


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    """One entry of message.tool_calls: arguments is a JSON text."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_deltas(calls: Sequence[dict]) -> list:
    """A stream delta's tool_calls: each whole call with its index."""
    return [dict(c, index=k) for k, c in enumerate(calls)]


def chat_chunk(rid: str, created: int, model: str, index: int, content: Optional[str] = None,
               role: Optional[str] = None, finish_reason: Optional[str] = None,
               with_usage_field: bool = False, usage_: Optional[dict] = None,
               logprobs: Optional[dict] = None, tool_calls: Optional[Sequence[dict]] = None) -> dict:
    """One streamed chat chunk for choice `index`: a delta with the role (the first chunk),
    some content, or nothing with the finish_reason (the last chunk). with_usage_field:
    the client asked for stream_options.include_usage, so every chunk has "usage": None.
    usage_: the usage on this chunk (Model.create_chat_completion's last chunk).
    logprobs: chat_logprobs(...) of this chunk's tokens.
    tool_calls: whole calls (tool_call dicts) for the delta, indexed in order."""
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_call_deltas(tool_calls)
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": SYSTEM_FINGERPRINT,
           "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field or usage_ is not None:
        out["usage"] = usage_
    return out


def chat_usage_chunk(rid: str, created: int, model: str, usage_: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [], "usage": usage_}


# ---------------------------------------------------------------- (text) completions
def completion(rid: str, created: int, model: str, choices: Sequence[tuple], usage_: dict) -> dict:
    """A whole text completion. choices: (text, finish_reason) or (text, finish_reason,
    CompletionLogprobs(...)(...) or None) in index order."""
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": i, "text": c[0], "logprobs": _choice_logprobs(c), "finish_reason": c[1]}
                    for i, c in enumerate(choices)],
        "usage": usage_,
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str = "",
                     finish_reason: Optional[str] = None, with_usage_field: bool = False,
                     usage_: Optional[dict] = None, logprobs: Optional[dict] = None) -> dict:
    """One streamed completion chunk (with_usage_field / usage_ / logprobs: as chat_chunk)."""
    out = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "system_fingerprint": SYSTEM_FINGERPRINT,
           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field or usage_ is not None:
        out["usage"] = usage_
    return out


def completion_usage_chunk(rid: str, created: int, model: str, usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [], "usage": usage_}


# ---------------------------------------------------------------- logprobs
LOGPROB_FLOOR = -9999.0  # what -inf is written as


def _lp(v: float) -> float:
    v = float(v)
    return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR


def token_piece(tokenizer, token_id: int) -> Tuple[str, bytes]:
    """(text, raw bytes) of one token: the bytes decoded with U+FFFD where a UTF-8
    character is incomplete (OpenAI's "token"), and the bytes themselves."""
    raw = tokenizer.token_to_bytes(int(token_id))
    return raw.decode("utf-8", errors="replace"), raw


def chat_logprobs(tokenizer, entries: Sequence) -> dict:
    """A chat choice's (or chunk's) logprobs: entries are TokenLogprobs-like, one per token."""
    content = []
    for e in entries:
        text, raw = token_piece(tokenizer, e.token_id)
        top = []
        for t, v in e.top:
            tt, tr = token_piece(tokenizer, t)
            top.append({"token": tt, "logprob": _lp(v), "bytes": list(tr)})
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": list(raw), "top_logprobs": top})
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Builds a completion choice's logprobs objects; one instance per choice, so that
    text_offset keeps running across the chunks of a stream (and after an echoed prompt)."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset

    def __call__(self, ids: Sequence[int], entries: Sequence) -> dict:
        """ids: the tokens; entries: their TokenLogprobs-like logprobs (None: no context,
        an echoed prompt's first token)."""
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, e in zip(ids, entries):
            text, _ = token_piece(self.tokenizer, tid)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if e is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_lp(e.logprob))
            d: dict = {}
            for t, v in e.top:
                d.setdefault(token_piece(self.tokenizer, t)[0], _lp(v))
            d.setdefault(text, _lp(e.logprob))
            tops.append(d)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------- models, errors
def model_card(model_id: str, created: int, owned_by: str = "orcd") -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def model_list(cards: Iterable[dict]) -> dict:
    return {"object": "list", "data": list(cards)}


def error(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
          code: Optional[str] = None) -> dict:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------- server-sent events
# JSON may carry U+0085, U+2028 and U+2029 raw, but line splitters built on str.splitlines()
# (httpx's iter_lines, for one) end a line at each: a token holding one cut its event's data line
# in two there (broken JSON for such a client). Escaped, every event stays whole for every reader.
_LINE_ENDS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_ENDS)


def sse_data(obj) -> bytes:
    """One `data: {...}` event (compact JSON, UTF-8; no character a line splitter breaks on)."""
    return b"data: " + _compact(obj).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_event(event: str, obj) -> bytes:
    """One named event: `event: NAME` and `data: {...}`."""
    return b"event: " + event.encode("ascii") + b"\ndata: " + _compact(obj).encode("utf-8") + b"\n\n"


_encode_string = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) returns


def json_string(text: str) -> bytes:
    """json.dumps(text, ensure_ascii=False) as UTF-8 (U+0085, U+2028, U+2029 escaped, as in
    sse_data), without building an encoder per call."""
    return _encode_string(text).translate(_LINE_ENDS).encode("utf-8")


class TextEvents:
    """Encodes the events of a stream that differ only in one text field, quickly: the
    JSON around the text is encoded once (the per-token cost of a stream is then one
    json.dumps of a short string). Build it from a shape whose text field is TextEvents.MARK:

        ev = TextEvents(chat_chunk(rid, created, model, 0, content=TextEvents.MARK))
        ev("hello") == sse_data(chat_chunk(rid, created, model, 0, content="hello"))
    """

    MARK = "\ue000orcd-text\ue001"

    def __init__(self, obj, event: Optional[str] = None):
        enc = sse_event(event, obj) if event else sse_data(obj)
        quoted = json.dumps(self.MARK, ensure_ascii=False).encode("utf-8")
        if enc.count(quoted) != 1:
            raise ValueError("TextEvents needs exactly one field equal to TextEvents.MARK")
        self._pre, _, self._post = enc.partition(quoted)

    def __call__(self, text: str) -> bytes:
        return self._pre + json_string(text) + self._post


__all__: List[str] = [
    "new_id", "now", "usage", "chat_completion", "tool_call", "tool_call_deltas", "chat_chunk",
    "chat_usage_chunk", "completion", "completion_chunk", "completion_usage_chunk", "model_card", "model_list", "error", "sse_data",
    "sse_event", "SSE_DONE", "json_string", "SYSTEM_FINGERPRINT", "TextEvents", "chat_logprobs", "CompletionLogprobs",
    "token_piece", "LOGPROB_FLOOR",
]
