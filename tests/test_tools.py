"""Tool calls (orcd.tools): parsing crafted model outputs into OpenAI tool_calls, the stream
splitter, the request checks, rendering of tool history through the real chat template, a
real request with a named tool_choice (the forced call's arguments validate against the
function's parameters with `jsonschema`), and the server with the official `openai` client:
response_format json_schema and tools.
"""
from __future__ import annotations

import json

import pytest

import orcd
from orcd import tools as T

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]


# ------------------------------------------------------------------ parsing (no model)
def test_parse_tagged_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    content, calls = T.parse_tool_calls(text)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"zone": "CET"}
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and isinstance(c["function"]["arguments"], str)
    assert calls[0]["id"] != calls[1]["id"]


def test_parse_edge_cases():
    # no call at all
    assert T.parse_tool_calls("Just text.") == ("Just text.", [])
    # bad JSON inside the tags: plain content, no calls
    bad = "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>"
    assert T.parse_tool_calls(bad) == (bad, [])
    # no name: not a call
    assert T.parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []
    # an unclosed last block whose JSON is complete (cut before </tool_call>)
    content, calls = T.parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')
    assert content is None and calls[0]["function"]["name"] == "f"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    # arguments already a JSON string; missing arguments -> {}
    _, calls = T.parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>'
                                  '<tool_call>{"name": "g"}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 2}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    # a bare JSON call (no tags) counts only for a known tool name with arguments
    bare = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    assert T.parse_tool_calls(bare, ["get_weather"])[1][0]["function"]["name"] == "get_weather"
    assert T.parse_tool_calls(bare, ["other"]) == (bare, [])
    assert T.parse_tool_calls(bare) == (bare, [])
    assert T.parse_tool_calls('{"name": "get_weather"}', ["get_weather"])[1] == []
    # unicode arguments stay readable
    _, calls = T.parse_tool_calls('<tool_call>{"name": "f", "arguments": {"c": "Zürich"}}</tool_call>')
    assert calls[0]["function"]["arguments"] == '{"c": "Zürich"}'


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 11])
def test_stream_splitter_equals_whole_parse(cut):
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>')
    s = T.ToolCallStream(["get_weather"])
    sent = "".join(s.feed(text[i:i + cut]) for i in range(0, len(text), cut))
    rest, calls = s.finish()
    assert sent == "Sure.\n" and rest == ""  # nothing of the call leaks as content
    whole_content, whole_calls = T.parse_tool_calls(text)
    assert [c["function"] for c in calls] == [c["function"] for c in whole_calls]
    # plain text: everything streams, ending with a tail that could have started a tag
    s = T.ToolCallStream(["get_weather"])
    plain = "a < b <tool"
    sent = "".join(s.feed(plain[i:i + cut]) for i in range(0, len(plain), cut))
    rest, calls = s.finish()
    assert sent + rest == plain and calls == []
    # a bare JSON answer is held back and comes out as content when it is not a call
    s = T.ToolCallStream(["get_weather"])
    js = '  {"answer": 42}'
    assert "".join(s.feed(js[i:i + cut]) for i in range(0, len(js), cut)) == ""
    assert s.finish() == (js, [])


def test_request_checks():
    assert T.check_tools(None) is None and T.check_tools([]) is None
    assert T.check_tool_choice(None, [WEATHER]) == "auto" and T.check_tool_choice(None, None) == "none"
    assert T.check_tool_choice("required", [WEATHER]) == "required"
    assert T.check_tool_choice({"type": "function", "function": {"name": "get_weather"}}, [WEATHER]) == \
        "function:get_weather"
    bad_tools = [({"type": "function"}, "tools\\[0\\].function"), ({"type": "x"}, "tools\\[0\\]"),
                 ({"type": "function", "function": {"name": "a b"}}, "name"),
                 ({"type": "function", "function": {"name": "f", "parameters": []}}, "parameters")]
    for t, msg in bad_tools:
        with pytest.raises(ValueError, match=msg):
            T.check_tools([t])
    with pytest.raises(ValueError, match="twice"):
        T.check_tools([WEATHER, WEATHER])
    with pytest.raises(ValueError, match="not in tools"):
        T.check_tool_choice({"type": "function", "function": {"name": "nope"}}, [WEATHER])
    with pytest.raises(ValueError, match="tool_choice"):
        T.check_tool_choice("sometimes", [WEATHER])
    with pytest.raises(ValueError, match="needs tools"):
        T.check_tool_choice("required", None)


def test_template_messages_parse_arguments():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    out = T.template_messages(msgs)
    assert out[0]["content"] == "" and out[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # the caller's list is untouched


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=1024) as m:
        yield m


def test_tool_history_renders_through_the_template(llm):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    text = llm.detokenize(llm.chat_ids(history, tools=[WEATHER]))
    # Qwen2.5's template: the tools in the system prompt, the call as a tagged JSON object,
    # the result inside <tool_response>
    assert '"name": "get_weather"' in text.split("</tools>\n\nFor each")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in text
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text
    ids = llm.chat_ids(history, tools=[WEATHER])
    assert llm.tokenizer.token_to_id("<tool_call>") in ids  # the template's tags are the special tokens


def test_named_tool_choice_forces_a_valid_call(llm):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(2):
        d = llm.create_chat_completion(ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60,
                                       temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        ch = d["choices"][0]
        assert ch["finish_reason"] == "tool_calls", ch
        (call,) = ch["message"]["tool_calls"]
        assert call["function"]["name"] == "get_time"  # the named one, not the one the question suggests
        jsonschema.validate(json.loads(call["function"]["arguments"]), TIME["function"]["parameters"])
    # auto: the model's own answer is parsed (this model answers the weather question with a call)
    d = llm.create_chat_completion(ASK, tools=[WEATHER], max_tokens=60, temperature=0)
    ch = d["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(ch["message"]["tool_calls"][0]["function"]["arguments"]),
                        WEATHER["function"]["parameters"])
    # streamed: the same call as one tool_calls delta at the end, finish_reason tool_calls
    chunks = list(llm.create_chat_completion(ASK, tools=[WEATHER], max_tokens=60, temperature=0, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    with_calls = [d for d in deltas if "tool_calls" in d]
    assert len(with_calls) == 1 and with_calls[0]["tool_calls"][0]["index"] == 0
    assert with_calls[0]["tool_calls"][0]["function"] == ch["message"]["tool_calls"][0]["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # none: tools are not rendered, nothing is parsed
    d = llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0)
    assert "tool_calls" not in d["choices"][0]["message"]
    assert d["usage"]["prompt_tokens"] == len(llm.chat_ids(ASK))


# ------------------------------------------------------------------ the server
def test_server_response_format_and_tools(real_model_path, tmp_path):
    openai = pytest.importorskip("openai")
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    from test_server import Server

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    with Server(real_model_path, "--n-ctx", "512", "--max-seqs", "2", log_dir=str(tmp_path), threads=2) as s:
        c = s.client()
        r = c.chat.completions.create(
            model=s.model_id, messages=ASK, n=2, max_tokens=40, temperature=1.0, seed=4,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}})
        assert len(r.choices) == 2
        for ch in r.choices:
            assert ch.finish_reason == "stop"
            jsonschema.validate(json.loads(ch.message.content), schema)
        # tools with a named choice: a forced call, parsed by the client's own types
        r = c.chat.completions.create(model=s.model_id, messages=ASK, tools=[WEATHER], max_tokens=60,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.tool_calls[0].type == "function"
        call = ch.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        # streamed: the client accumulates the tool_calls delta
        stream = c.chat.completions.create(model=s.model_id, messages=ASK, tools=[WEATHER], max_tokens=60,
                                           temperature=0, tool_choice="required", stream=True)
        calls, finish = [], None
        for chunk in stream:
            d = chunk.choices[0].delta
            calls += d.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
        # vLLM's guided_regex on a completion
        r = c.completions.create(model=s.model_id, prompt="Year: ", max_tokens=8, temperature=1.0,
                                 extra_body={"guided_regex": "19[0-9]{2}"})
        assert r.choices[0].finish_reason == "stop" and len(r.choices[0].text) == 4
        assert r.choices[0].text.startswith("19") and r.choices[0].text.isdigit()
        # bad constraints: 400 naming the field
        for kw, param in ((dict(response_format={"type": "yaml"}), "response_format"),
                          (dict(extra_body={"regex": "[a-"}), "regex"),
                          (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}),
                           "tool_choice")):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=s.model_id, messages=ASK, max_tokens=4, **kw)
            assert e.value.body["param"] == param, e.value.body
        assert s.stop() == 0
