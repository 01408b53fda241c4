"""Parsing and validation of OpenAI requests (/v1/completions, /v1/chat/completions)
into orcd's SamplingParams: every bad value is an ApiError 400 naming the parameter.

Defaults are OpenAI's where the client sends nothing: temperature 1, top_p 1, no top_k,
no min_p, no penalties, n 1; max_tokens 16 for completions (OpenAI's legacy default) and
up to the context for chat. Extensions accepted as llama.cpp and vLLM do: top_k (0 or -1:
off), min_p, repetition_penalty, ignore_eos. Penalties look at the last 64 tokens
(SamplingParams.penalty_last_n).

Logprobs: chat logprobs=true with top_logprobs in [0, MAX_LOGPROBS] (top_logprobs alone
is a 400); completions logprobs in [0, MAX_LOGPROBS] (OpenAI allows 5, vLLM 20) and echo
(the prompt's text first; with logprobs its tokens' logprobs too, the first null). The
values are the model's raw distribution: log_softmax of the logits before penalties,
temperature, top-k/p (vLLM's default), see openai_format.

Refused with 400 "not supported yet" rather than ignored: suffix, best_of > n,
logit_bias, functions (the legacy form of tools).

Structured output (orcd.structured, llguidance): response_format (text, json_object,
json_schema); orcd's regex / grammar (Lark or GBNF), also under vLLM's names guided_regex /
guided_grammar, and guided_json (a schema). Tool calls (chat): tools and tool_choice
(orcd.tools). Their shapes are checked here; the grammars are compiled with the tokenizer
(openai_api), which names the field of a bad one.

Bounds: n in [1, MAX_N]; at most MAX_PROMPTS prompts in one completion request; at most
MAX_STOPS stop strings, each 1..MAX_STOP_CHARS characters.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Union

from ..types import MAX_LOGPROBS, SamplingParams
from .errors import ApiError

MAX_N = 32
MAX_PROMPTS = 32
MAX_STOPS = 16
MAX_STOP_CHARS = 256
_U64 = 2**64


@dataclass
class OpenAIRequest:
    kind: str                        # "chat" or "completion"
    model: Optional[str]
    params: SamplingParams           # seed: the first choice's (choice i gets seed + i)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False                # completion: the prompt's text first
    cache_prompt: bool = True         # llama.cpp's: reuse a free slot's cached prefix of the prompt
    messages: list = field(default_factory=list)                       # chat
    prompts: List[Union[str, List[int]]] = field(default_factory=list)  # completion
    # structured output and tool calls, as sent (None: not given)
    response_format: Optional[dict] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None
    tools: Optional[list] = None
    tool_choice: object = None
    tool_mode: str = "none"          # set by the handler: orcd.tools.check_tool_choice's answer

    @property
    def constrained(self) -> bool:
        """Whether the request asks for structured output or tools (a grammar to compile)."""
        rf = self.response_format
        return (rf is not None and rf.get("type") != "text") or self.regex is not None or \
            self.grammar is not None or self.tools is not None or self.tool_choice is not None

    def params_for(self, i: int) -> SamplingParams:
        """The parameters of choice i (of n): seed + i when a seed was given."""
        if self.params.seed is None or i == 0:
            return self.params
        return self.params.replace(seed=(self.params.seed + i) % _U64)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _unsupported(param: str, what: str = "") -> ApiError:
    return ApiError(400, f"{param}{what} is not supported yet by this server", param=param,
                    code="unsupported_parameter")


def _is_num(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or v != v:
        raise _bad(name, f"{name} must be a number (got {v!r})")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _bad(name, f"{name} must be in {rng} (got {v!r})")
    return float(v)


def integer(body: dict, name: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise _bad(name, f"{name} must be an integer (got {v!r})")
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                   + f" (got {v!r})")
    return int(v)


def boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false (got {v!r})")
    return v


def parse_stop(v, name: str = "stop") -> Optional[List[str]]:
    """A stop string or a list of them (None / [] -> None)."""
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list):
        raise _bad(name, f"{name} must be a string or a list of strings (got {type(v).__name__})")
    if len(stops) > MAX_STOPS:
        raise _bad(name, f"{name} has {len(stops)} strings (at most {MAX_STOPS})")
    for s in stops:
        if not isinstance(s, str):
            raise _bad(name, f"{name} must contain only strings (got {s!r})")
        if not s or len(s) > MAX_STOP_CHARS:
            raise _bad(name, f"each {name} string must have 1 to {MAX_STOP_CHARS} characters (got {len(s)})")
    return stops or None


def parse_seed(v, name: str = "seed") -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v):
        raise _bad(name, f"{name} must be an integer (got {v!r})")
    return int(v) % _U64


def _refuse_unsupported(body: dict, kind: str) -> None:
    if kind != "chat":
        if body.get("suffix") not in (None, ""):
            raise _unsupported("suffix")
    if body.get("logit_bias") not in (None, {}):
        raise _unsupported("logit_bias")
    if body.get("functions") not in (None, []):
        raise _unsupported("functions", " (use tools)")
    if kind != "chat":
        for name in ("tools", "tool_choice"):
            if body.get(name) is not None:
                raise _bad(name, f"{name} is a chat completion parameter")


def _structured(body: dict, req: "OpenAIRequest") -> None:
    """response_format, regex / guided_regex, grammar / guided_grammar, guided_json, tools,
    tool_choice: shapes checked, values kept for the grammar compiler."""
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise _bad("response_format", "response_format must be an object with a type")
        if rf["type"] not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", f"response_format.type must be 'text', 'json_object' or "
                                          f"'json_schema' (got {rf['type']!r})")
        if rf["type"] == "json_schema" and not isinstance(rf.get("json_schema"), dict):
            raise _bad("response_format", "response_format.json_schema must be an object {name, schema, strict}")
    gj = body.get("guided_json")
    if gj is not None:
        if rf is not None and rf.get("type") != "text":
            raise _bad("guided_json", "guided_json and response_format cannot be combined")
        if not isinstance(gj, (dict, str)):
            raise _bad("guided_json", "guided_json must be a JSON schema (an object or its JSON text)")
        rf = {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": gj}}
    req.response_format = rf
    for name, alias in (("regex", "guided_regex"), ("grammar", "guided_grammar")):
        v, used = body.get(name), name
        if body.get(alias) is not None:
            if v is not None:
                raise _bad(alias, f"{name} and {alias} cannot both be given")
            v, used = body.get(alias), alias
        if v is not None and (not isinstance(v, str) or not v):
            raise _bad(used, f"{used} must be a non-empty string")
        setattr(req, name, v)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    req.tools = tools or None
    req.tool_choice = body.get("tool_choice")


def _sampling(body: dict, kind: str) -> SamplingParams:
    mct = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mct is not None else "max_tokens"
    max_tokens = integer(body, name, 16 if kind == "completion" else None, 1)
    top_k = integer(body, "top_k", 0, -1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=0 if top_k == -1 else top_k,
        min_p=number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=parse_seed(body.get("seed")),
        stop=parse_stop(body.get("stop")),
        ignore_eos=boolean(body, "ignore_eos", False),
    )


def _messages(v) -> list:
    """OpenAI messages -> [{"role", "content": str}] for the chat template (text parts of a
    list content joined with newlines; "developer" read as "system")."""
    if not isinstance(v, list) or not v:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _bad("messages", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad("messages", f"messages[{i}].role must be a non-empty string (got {role!r})")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict)
                and isinstance(c["function"].get("name"), str) for c in calls)):
            raise _bad("messages", f"messages[{i}].tool_calls must be a list of "
                                   "{id, type: \"function\", function: {name, arguments}} objects")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise _bad("messages", f"messages[{i}].content[{j}] must be a text part "
                                           f"({{\"type\": \"text\", \"text\": ...}}; got {kind!r})")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string or a list of text parts "
                                   f"(got {type(content).__name__})")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):  # tool calls and results, for the template
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def _prompts(v) -> List[Union[str, List[int]]]:
    """str | [str, ...] | [int, ...] | [[int, ...], ...] -> a list of prompts."""
    def ids(x, where):
        if not x:
            raise _bad("prompt", f"{where} is empty")
        if not all(_is_int(t) for t in x):
            raise _bad("prompt", f"{where} must be a string, a list of strings or a list of token ids")
        return [int(t) for t in x]

    if isinstance(v, str):
        out = [v]
    elif isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            out = list(v)
        elif all(_is_int(t) for t in v):
            out = [ids(v, "prompt")]
        elif all(isinstance(p, list) for p in v):
            out = [ids(p, f"prompt[{i}]") for i, p in enumerate(v)]
        else:
            raise _bad("prompt", "prompt must be a string, a list of strings, a list of token ids "
                                 "or a list of lists of token ids")
    else:
        raise _bad("prompt", "prompt must be a non-empty string, list of strings or list of token ids")
    if len(out) > MAX_PROMPTS:
        raise _bad("prompt", f"{len(out)} prompts in one request (at most {MAX_PROMPTS})")
    for i, p in enumerate(out):
        if isinstance(p, str) and not p:
            raise _bad("prompt", "prompt is empty" if len(out) == 1 else f"prompt[{i}] is empty")
    return out


def parse(body, kind: str) -> OpenAIRequest:
    """kind: "chat" or "completion". Raises ApiError 400 naming the bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"model must be a string (got {model!r})")
    _refuse_unsupported(body, kind)
    n = integer(body, "n", 1, 1, MAX_N)
    best_of = integer(body, "best_of", None, 1) if kind == "completion" else None
    if best_of is not None and best_of != n:
        raise _unsupported("best_of", " other than n")
    stream = boolean(body, "stream", False)
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", "stream_options must be an object")
        include_usage = boolean(so, "include_usage", False)
    params = _sampling(body, kind)
    echo = False
    if kind == "chat":
        logprobs = boolean(body, "logprobs", False)
        top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not logprobs:
            raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
        if logprobs:
            params = params.replace(logprobs=top or 0)
    else:
        n_lp = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        echo = boolean(body, "echo", False)
        if n_lp is not None:
            params = params.replace(logprobs=n_lp, prompt_logprobs=n_lp if echo else None)
    req = OpenAIRequest(kind=kind, model=model, params=params, n=n, stream=stream,
                        include_usage=include_usage and stream, echo=echo,
                        cache_prompt=boolean(body, "cache_prompt", True))
    if kind == "chat":
        req.messages = _messages(body.get("messages"))
    else:
        req.prompts = _prompts(body.get("prompt"))
    _structured(body, req)
    return req
