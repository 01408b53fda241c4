"""orcd.tools: OpenAI tool calls (function calling) for chat models whose template writes
calls as Hermes / Qwen2.5 do:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

check_tools / check_tool_choice validate a request's `tools` and `tool_choice`
("none", "auto", "required" or {"type": "function", "function": {"name": ...}});
template_messages makes OpenAI history (assistant tool_calls with JSON-string
arguments, `tool` results) what the chat templates expect (arguments as objects);
tool_call_grammar is the Lark grammar (llguidance) that forces a valid call when
tool_choice names a function or is "required"; parse_tool_calls turns the model's text
into OpenAI `tool_calls`; ToolCallStream does it for a stream (text before the first
<tool_call> streams as content; the calls come as one delta at the end).

Bounds: at most MAX_TOOLS tools per request; function names are 1..64 characters of
[A-Za-z0-9_-] (OpenAI's rule).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import List, Optional, Tuple

from .openai_format import tool_call

MAX_TOOLS = 128
CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_NAME_RX = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CALL_RX = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def check_tools(tools) -> Optional[list]:
    """The request's tools (OpenAI's [{"type": "function", "function": {name, description?,
    parameters?}}]) checked; None or [] -> None. ValueError names the bad entry."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}} "
                         f"(got {type(tools).__name__})")
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools has {len(tools)} entries (at most {MAX_TOOLS})")
    seen = set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ValueError(f"tools[{i}] must be an object with \"type\": \"function\"")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ValueError(f"tools[{i}].function must be an object with a name")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME_RX.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-' (got {name!r})")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} appears twice")
        seen.add(name)
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = f.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
    return tools


def check_tool_choice(tool_choice, tools: Optional[list]) -> str:
    """tool_choice -> "none", "auto", "required" or "function:<name>". The default is "auto"
    with tools and "none" without (as OpenAI)."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (got {tool_choice!r})")
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs tools")
        return tool_choice if tools else "none"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        names = [t["function"]["name"] for t in tools or []]
        if name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools "
                             f"({', '.join(map(repr, names)) or 'none given'})")
        return "function:" + name
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def template_messages(messages: list) -> list:
    """OpenAI messages as chat templates take them: an assistant message's tool_calls with
    their arguments (a JSON string in OpenAI's shape) parsed into objects (a string that is
    not JSON stays a string). Other messages are returned as they are."""
    if not isinstance(messages, (list, tuple)):
        return messages  # validate_messages names the problem
    out = []
    for m in messages:
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls:
            mm = dict(m)
            mm["tool_calls"] = [_template_call(c) for c in calls]
            if mm.get("content") is None:
                mm["content"] = ""
            out.append(mm)
        else:
            out.append(m)
    return out


def _template_call(c):
    if not isinstance(c, dict):
        return c
    f = c.get("function")
    if isinstance(f, dict) and isinstance(f.get("arguments"), str):
        try:
            args = json.loads(f["arguments"])
        except ValueError:
            return c
        c = dict(c, function=dict(f, arguments=args))
    return c


def _call_schema(tool: dict) -> dict:
    f = tool["function"]
    params = f.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_grammar(tools: list, choice: str, tokenizer=None) -> Optional[str]:
    """A Lark grammar (llguidance) whose texts are one tool call: of the named function for
    "function:<name>", of any of the tools for "required" (one call: a grammar allowing
    more lets a model at low temperature repeat calls until max_tokens); None for "auto" /
    "none". <tool_call> / </tool_call> are matched as the tokenizer's special tokens
    when it has them (Qwen2.5 does), else as text."""
    if choice in ("auto", "none"):
        return None
    if choice.startswith("function:"):
        name = choice[len("function:"):]
        chosen = [t for t in tools if t["function"]["name"] == name]
    else:
        chosen = list(tools)

    def tag(text):
        tid = tokenizer.token_to_id(text) if tokenizer is not None else None
        if tid is not None and tokenizer.is_special(tid):
            return text  # llguidance's syntax for a special token by name
        return json.dumps(text)

    lines = ["%llguidance {}", ""]
    call = f'{tag(CALL_OPEN)} "\\n" body "\\n" {tag(CALL_CLOSE)}'
    lines.append("start: call")
    lines.append(f"call: {call}")
    lines.append("body: " + " | ".join(f"fn_{i}" for i in range(len(chosen))))
    for i, t in enumerate(chosen):
        lines.append(f"fn_{i}: %json " + json.dumps(_call_schema(t)))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- parsing the model's text
def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _parse_call(body: str) -> Optional[dict]:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            json.loads(args)
            arg_text = args
        except ValueError:
            return None
    else:
        arg_text = json.dumps(args, ensure_ascii=False)
    return tool_call(new_call_id(), obj["name"], arg_text)


def parse_tool_calls(text: str, names=None) -> Tuple[Optional[str], List[dict]]:
    """(content, tool_calls) of a model's answer: every <tool_call>{json}</tool_call> block
    (an unclosed last block counts when its JSON is complete) becomes an OpenAI tool call
    {id, type: "function", function: {name, arguments: JSON string}}; the text around them,
    stripped, is the content (None when empty). A block that is not a call (bad JSON, no
    name) makes the whole text plain content, with no calls. names: the tools' names; an
    answer that is only a JSON object {"name": one of them, "arguments": ...} without the
    tags (small models write that) is a call too."""
    if CALL_OPEN not in text:
        bare = text.strip()
        if names and bare.startswith("{"):
            call = _parse_call(bare)
            if call is not None and call["function"]["name"] in names and '"arguments"' in bare:
                return None, [call]
        return text, []
    calls, rest, pos = [], [], 0
    for m in _CALL_RX.finditer(text):
        call = _parse_call(m.group(1).strip())
        if call is None:
            return text, []
        calls.append(call)
        rest.append(text[pos:m.start()])
        pos = m.end()
    tail = text[pos:]
    if CALL_OPEN in tail:  # an unclosed block (the model stopped before </tool_call>)
        i = tail.index(CALL_OPEN)
        call = _parse_call(tail[i + len(CALL_OPEN):].strip())
        if call is None:
            return text, []
        calls.append(call)
        tail = tail[:i]
    rest.append(tail)
    content = "".join(rest).strip()
    return (content or None), calls


class ToolCallStream:
    """Streams a tool-enabled answer: feed(piece) returns the text to send as content now;
    from the first <tool_call> on (and any tail that may begin one) text is held back, and
    so is an answer that starts with "{" when names are given (it may be a bare call, see
    parse_tool_calls); finish() returns (content still to send, tool_calls)."""

    def __init__(self, names=None):
        self._names = names
        self._held = ""
        self._in_calls = False
        self._started = False  # a non-blank character was seen

    def feed(self, piece: str) -> str:
        if self._in_calls:
            self._held += piece
            return ""
        text = self._held + piece
        if not self._started:
            bare = text.lstrip()
            if not bare:
                self._held = text
                return ""
            self._started = True
            if self._names and bare.startswith("{"):
                self._in_calls = True
                self._held = text
                return ""
        i = text.find(CALL_OPEN)
        if i >= 0:
            self._in_calls = True
            self._held = text[i:]
            return text[:i]
        keep = 0
        for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(CALL_OPEN[:k]):
                keep = k
                break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> Tuple[str, List[dict]]:
        held, self._held = self._held, ""
        if not self._in_calls:
            return held, []
        content, calls = parse_tool_calls(held, self._names)
        if not calls:
            return held, []
        return content or "", calls
