"""Model.create_completion / create_chat_completion: OpenAI-shaped results on the real
model (CPU), checked against the openai package's own response types (an independent
definition of the shapes) and against Model.generate / Model.chat with the same seed."""
import pytest

import orcd

openai_types = pytest.importorskip("openai.types")
from openai.types import Completion as OACompletion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

PROMPT = "def fibonacci(n):"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
SAMPLED = dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=11, presence_penalty=0.3,
               frequency_penalty=0.2, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=512) as m:
        yield m


def _check_common(d, obj, prefix):
    assert d["object"] == obj and d["id"].startswith(prefix + "-")
    assert isinstance(d["created"], int) and d["model"] == "qwen2.5-coder-0.5b-instruct-q4_k_m"


def test_completion_shape_and_text_equal_generate(llm):
    d = llm.create_completion(PROMPT, max_tokens=12, **SAMPLED)
    want = llm.generate(PROMPT, max_tokens=12, **SAMPLED)
    OACompletion.model_validate(d)  # the openai client's own definition of the shape
    _check_common(d, "text_completion", "cmpl")
    assert set(d) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    (ch,) = d["choices"]
    assert set(ch) == {"index", "text", "logprobs", "finish_reason"}
    assert ch["index"] == 0 and ch["logprobs"] is None
    assert ch["text"] == want.text and ch["finish_reason"] == want.finish_reason == "length"
    assert d["usage"] == {"prompt_tokens": want.usage.prompt_tokens, "completion_tokens": 12,
                          "total_tokens": want.usage.prompt_tokens + 12}
    assert d["usage"]["prompt_tokens"] == len(llm.tokenize(PROMPT))


def test_parameters_map_to_sampling_params(llm):
    p = orcd.SamplingParams(max_tokens=10, **SAMPLED)
    assert llm.create_completion(PROMPT, params=p)["choices"][0]["text"] == llm.generate(PROMPT, p).text
    # keyword arguments override params, as in generate
    d = llm.create_completion(PROMPT, params=p, temperature=0)
    assert d["choices"][0]["text"] == llm.generate(PROMPT, max_tokens=10, temperature=0).text
    # the defaults are SamplingParams' (max_tokens 256): a long answer stops at 256
    d = llm.create_completion("Count from 1 to 1000, one number per line:\n1\n2\n", seed=3)
    assert d["usage"]["completion_tokens"] == orcd.SamplingParams().max_tokens
    assert d["choices"][0]["finish_reason"] == "length"


def test_stop_and_finish_reason_stop(llm):
    greedy = llm.generate(PROMPT, max_tokens=24, temperature=0).text
    stop = greedy[6:9]  # a piece of the text the greedy run produces
    d = llm.create_completion(PROMPT, max_tokens=24, temperature=0, stop=[stop])
    ch = d["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["text"] == greedy[: greedy.index(stop)]


def test_completion_stream_joins_to_the_same_text(llm):
    want = llm.generate(PROMPT, max_tokens=16, **SAMPLED)
    chunks = list(llm.create_completion(PROMPT, max_tokens=16, stream=True, **SAMPLED))
    assert len(chunks) >= 2
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    OACompletion.model_validate(chunks[-1])  # (the client reads earlier chunks unvalidated: finish_reason None)
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "system_fingerprint", "choices"} | (
            {"usage"} if c is chunks[-1] else set())
        assert c["object"] == "text_completion" and c["choices"][0]["index"] == 0
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == want.finish_reason
    assert last["usage"] == want.usage.as_dict()
    assert all("usage" not in c for c in chunks[:-1])


def test_chat_completion_shape_and_text_equal_chat(llm):
    d = llm.create_chat_completion(MESSAGES, max_tokens=40, **SAMPLED)
    want = llm.chat(MESSAGES, max_tokens=40, **SAMPLED)
    ChatCompletion.model_validate(d)
    _check_common(d, "chat.completion", "chatcmpl")
    (ch,) = d["choices"]
    assert set(ch) == {"index", "message", "logprobs", "finish_reason"}
    assert ch["message"] == {"role": "assistant", "content": want.text}
    assert ch["finish_reason"] == want.finish_reason and ch["logprobs"] is None
    assert d["usage"] == want.usage.as_dict()
    assert d["usage"]["prompt_tokens"] == len(llm.chat_ids(MESSAGES))


def test_chat_stream_chunks(llm):
    want = llm.chat(MESSAGES, max_tokens=40, temperature=0)
    assert want.finish_reason == "stop"  # the model ends the short answer itself
    it = llm.create_chat_completion(MESSAGES, max_tokens=40, temperature=0, stream=True)
    chunks = list(it)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert c["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    last = chunks[-1]
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"] == want.usage.as_dict()
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_stopped_early_frees_the_model(llm):
    it = llm.create_completion(PROMPT, max_tokens=50, temperature=0, stream=True)
    next(it)
    it.close()
    # the model is usable again and gives the same greedy text
    a = llm.create_completion(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert a == llm.generate(PROMPT, max_tokens=8, temperature=0).text


def test_bad_arguments_raise_at_the_call(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm.create_completion(PROMPT, top_p=1.5, stream=True)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.create_chat_completion(MESSAGES, max_tokens=0)
    with pytest.raises(TypeError, match="stream"):
        llm.create_completion(PROMPT, stream="yes")
    with pytest.raises(TypeError, match="prompt"):
        llm.create_completion(b"bytes")
