"""The typed Python API: SamplingParams (params=), Completion / Usage / CompletionStream,
real signatures, exports, stubs; and clear errors for bad arguments (issue 11 item 8)."""
import dataclasses
import inspect
import os

import pytest

import orcd
from orcd import Completion, CompletionStream, SamplingParams, Usage

GREEDY = dict(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    with orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=64) as m:
        yield m


def test_exports_and_docstrings():
    for name in ("Model", "SamplingParams", "Completion", "CompletionStream", "Usage", "Tokenizer",
                 "GGUFFile", "DefaultModelMissing", "cuda_available", "cuda_status"):
        obj = getattr(orcd, name)
        assert name in orcd.__all__
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
    for meth in ("generate", "stream", "chat", "stream_chat", "chat_ids", "tokenize", "detokenize", "logits",
                 "close"):
        assert (getattr(orcd.Model, meth).__doc__ or "").strip(), meth


def test_signatures_list_the_sampling_parameters():
    fields = [f.name for f in dataclasses.fields(SamplingParams)]
    for meth in ("generate", "stream", "chat", "stream_chat"):
        params = inspect.signature(getattr(orcd.Model, meth)).parameters
        assert "params" in params
        assert [n for n in params if n in fields] == fields, meth
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values()), meth


def test_cli_defaults_come_from_sampling_params():
    from orcd.cli import build_parser

    a = build_parser().parse_args(["generate", "x"])
    d = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if hasattr(a, f.name):
            assert getattr(a, f.name) == getattr(d, f.name), f.name


def test_native_sampler_takes_every_argument():
    """The binding has no defaults of its own (they live in SamplingParams only)."""
    from orcd import _orcd

    with pytest.raises(TypeError):
        _orcd.Sampler(temperature=0.5)


def test_stub_and_py_typed_installed():
    d = os.path.dirname(orcd.__file__)
    assert os.path.isfile(os.path.join(d, "py.typed"))
    stub = open(os.path.join(d, "_orcd.pyi")).read()
    assert "class Sampler" in stub and "class CpuEngine" in stub and "def forward(" in stub


def test_params_equals_keywords_and_keywords_override(tiny):
    p = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    a = tiny.generate([10, 11, 12], params=p)
    b = tiny.generate([10, 11, 12], max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    c = tiny.generate([10, 11, 12], p, max_tokens=3)
    assert c.token_ids == a.token_ids[:3]
    assert p.max_tokens == 6  # not modified
    with pytest.raises(TypeError, match="params"):
        tiny.generate("hi", params={"temperature": 0})


def test_completion_and_usage_types(tiny):
    out = tiny.generate([10, 11, 12], **GREEDY)
    assert isinstance(out, Completion) and isinstance(out.usage, Usage)
    assert out.finish_reason == "length"
    assert all(type(t) is int for t in out.token_ids)
    assert out.usage == Usage(prompt_tokens=3, completion_tokens=8, total_tokens=11)
    assert out.usage["prompt_tokens"] == 3 and out.usage.as_dict()["total_tokens"] == 11
    with pytest.raises(KeyError):
        out.usage["nope"]


def test_stream_reports_finish_reason_and_usage(tiny):
    full = tiny.generate([10, 11, 12], **GREEDY)
    s = tiny.stream([10, 11, 12], **GREEDY)
    assert isinstance(s, CompletionStream) and s.finish_reason is None
    text = "".join(s)
    assert text == full.text == s.text
    assert s.finish_reason == "length" and s.usage == full.usage and s.token_ids == full.token_ids
    t = full.token_ids[2]
    k = full.token_ids.index(t)
    s2 = tiny.stream([10, 11, 12], max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[t])
    c = s2.completion()
    assert c.finish_reason == "stop" == s2.finish_reason and c.token_ids == full.token_ids[:k]
    assert c.usage == Usage(3, k, 3 + k)


def test_sampling_params_validation_names_the_field():
    cases = [
        (dict(top_k=-5), ValueError, "top_k"),
        (dict(top_k=1.5), TypeError, "top_k"),
        (dict(stop=123), TypeError, "stop"),
        (dict(stop=[""]), ValueError, "stop"),
        (dict(stop=["a", 3]), TypeError, "stop"),
        (dict(max_tokens=0), ValueError, "max_tokens"),
        (dict(max_tokens="5"), TypeError, "max_tokens"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(penalty_last_n=-2), ValueError, "penalty_last_n"),
        (dict(penalty_last_n=2**40), ValueError, "penalty_last_n"),
        (dict(stop_token_ids=5), TypeError, "stop_token_ids"),
        (dict(ignore_eos="yes"), TypeError, "ignore_eos"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            SamplingParams(**kw)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(top_k=-5), ValueError, "top_k"),
    (dict(stop=123), TypeError, "stop"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(stop_token_ids=[10**9]), ValueError, "stop_token_ids"),
])
def test_generate_rejects_bad_sampling_arguments(tiny, kw, exc, name):
    with pytest.raises(exc, match=name):
        tiny.generate("hi", **kw)
    with pytest.raises(exc, match=name):
        tiny.stream("hi", **kw)


def test_huge_top_k_keeps_every_token(tiny):
    """top_k=10**10 (past the native int) is the same as no top_k filter."""
    kw = dict(max_tokens=8, temperature=1.0, seed=9, top_p=1.0, min_p=0.0, ignore_eos=True)
    assert tiny.generate([10, 11], top_k=10**10, **kw).token_ids == tiny.generate([10, 11], top_k=0, **kw).token_ids


def test_bad_prompts(tiny):
    with pytest.raises(TypeError, match="prompt"):
        tiny.generate(b"hello")
    with pytest.raises(TypeError, match="prompt"):
        tiny.generate(12)
    with pytest.raises(TypeError, match="prompt"):
        tiny.generate([1, "2"])
    with pytest.raises(ValueError, match="out of range"):
        tiny.generate([-1])


@pytest.mark.parametrize("kw,exc", [
    (dict(n_threads=-1), ValueError), (dict(n_threads=1.5), TypeError), (dict(n_threads="4"), TypeError),
    (dict(n_ctx=0), ValueError), (dict(n_slots=0), ValueError), (dict(n_ctx=True), TypeError),
])
def test_model_arguments(tiny_model, kw, exc):
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        orcd.Model(tiny_model("Q8_0"), device="cpu", **kw)


def test_closed_model_is_a_clear_error(tiny_model):
    m = orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=64)
    m.generate([10, 11], **GREEDY)
    m.close()
    m.close()  # twice is fine
    # the same prompt again must not answer from the cached logits
    for call in (lambda: m.generate([10, 11], **GREEDY), lambda: m.stream([10, 11], **GREEDY),
                 lambda: m.chat([{"role": "user", "content": "hi"}]), lambda: m.logits([1, 2])):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert m.closed and "closed" in repr(m)


def test_text_too_long_for_n_ctx_is_rejected_before_tokenizing(tiny):
    """A text longer than n_ctx x the longest token's bytes cannot fit: ValueError at once,
    whatever its size (the issue's probe: 100 MB of text with n_ctx=256 aborted in the tokenizer)."""
    mtb = tiny.tokenizer.max_token_bytes
    # an independent maximum over the vocabulary's byte strings
    assert mtb == max(len(tiny.tokenizer.token_to_bytes(i)) for i in range(tiny.tokenizer.n_vocab))
    limit = tiny.n_ctx * mtb
    with pytest.raises(ValueError, match="n_ctx"):
        tiny.generate("a" * (limit + 1))
    with pytest.raises(ValueError, match="n_ctx"):
        tiny.generate("é" * (limit // 2 + 1))  # counted in UTF-8 bytes
    with pytest.raises(ValueError, match="n_ctx"):
        tiny.chat([{"role": "user", "content": "a" * (limit + 1)}])
    with pytest.raises(ValueError, match="n_ctx"):
        tiny.generate([1] * (tiny.n_ctx + 1))


def test_huge_prompt_real_model(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as m:
        with pytest.raises(ValueError, match="n_ctx=256"):
            m.generate("hello world " * 8_333_333)
