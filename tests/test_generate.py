"""The Python API end to end on the real model: generate, stream, chat, stop
handling, determinism, parameter validation, and the haiku acceptance test."""
import os
import re
import time

import numpy as np
import pytest

import orcd

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}


def minute_word(m: int) -> str:
    if m < 20:
        return ONES[m]
    t, u = divmod(m, 10)
    return TENS[t] if u == 0 else f"{TENS[t]}-{ONES[u]}"


def test_minute_words():
    assert [minute_word(m) for m in (0, 9, 13, 20, 21, 45, 59)] == [
        "zero", "nine", "thirteen", "twenty", "twenty-one", "forty-five", "fifty-nine"]


def contains_word(text: str, word: str) -> bool:
    return re.search(r"(?<![A-Za-z])" + re.escape(word) + r"(?![A-Za-z-])", text, re.IGNORECASE) is not None


def test_contains_word():
    assert contains_word("Forty-five cores hum", "forty-five")
    assert not contains_word("fortyfive", "forty-five")
    assert not contains_word("someone", "one")
    assert not contains_word("twenty-one", "twenty")


@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=1024) as m:
        yield m


def test_greedy_generate_matches_engine_argmax(llm):
    """generate(temperature=0) is the argmax chain of the engine's logits."""
    prompt = "def fibonacci(n):"
    out = llm.generate(prompt, max_tokens=12, temperature=0)
    ids = llm.tokenize(prompt)
    want = []
    for _ in range(12):
        t = int(np.argmax(llm.logits(ids + want)[-1]))
        if t in llm.tokenizer.eos_ids:
            break
        want.append(t)
    assert out.token_ids == want
    assert out.text == llm.detokenize(want)
    assert out.finish_reason in ("length", "stop")
    assert out.usage == orcd.Usage(prompt_tokens=len(ids), completion_tokens=len(want),
                                   total_tokens=len(ids) + len(want))
    assert out.usage["prompt_tokens"] == len(ids)


def test_chat_answers_arithmetic(llm):
    out = llm.chat([{"role": "user", "content": "What is 2+2? Answer with the number only."}], temperature=0,
                   max_tokens=16)
    assert "4" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.text


def test_stream_equals_generate(llm):
    kw = dict(max_tokens=24, temperature=0.7, seed=123)
    full = llm.generate("Write a sentence about the sea.", **kw)
    pieces = list(llm.stream("Write a sentence about the sea.", **kw))
    assert "".join(pieces) == full.text
    assert len(pieces) > 1


def test_same_seed_same_tokens_and_different_seed_differs(llm):
    msgs = [{"role": "user", "content": "Name three colors."}]
    a = llm.chat(msgs, max_tokens=30, temperature=1.0, seed=7)
    b = llm.chat(msgs, max_tokens=30, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids
    outs = {tuple(llm.chat(msgs, max_tokens=30, temperature=1.0, seed=s).token_ids) for s in range(8, 12)}
    assert len(outs) > 1


def test_stop_strings(llm):
    base = llm.generate("1, 2, 3, 4, 5,", max_tokens=20, temperature=0)
    assert " 8" in base.text
    out = llm.generate("1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=[" 8"])
    assert out.finish_reason == "stop"
    assert out.text == base.text[: base.text.index(" 8")]
    pieces = "".join(llm.stream("1, 2, 3, 4, 5,", max_tokens=20, temperature=0, stop=" 8"))
    assert pieces == out.text


def test_stop_token_ids_and_length(llm):
    out = llm.generate("Count: 1, 2, 3,", max_tokens=3, temperature=0)
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    first = out.token_ids[0]
    out2 = llm.generate("Count: 1, 2, 3,", max_tokens=3, temperature=0, stop_token_ids=[first])
    assert out2.token_ids == [] and out2.finish_reason == "stop"


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-3), "seed"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_parameters_name_the_parameter(llm, kw, name):
    with pytest.raises(ValueError, match=name):
        llm.generate("hi", **kw)


def test_bad_inputs(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([llm.n_vocab + 5])
    with pytest.raises(ValueError, match="n_ctx"):
        llm.generate([1] * 2000)
    with pytest.raises(TypeError, match="bogus"):
        llm.generate("hi", bogus=1)
    with pytest.raises(TypeError, match="prompt"):
        llm.generate(b"hello")
    with pytest.raises(ValueError, match="top_k"):
        llm.generate("hi", top_k=-5)
    with pytest.raises(TypeError, match="stop"):
        llm.generate("hi", stop=123)
    with pytest.raises(ValueError, match="role|content"):
        llm.chat([{"content": "no role"}])


def test_prompt_token_ids_and_text_prompts_agree(llm):
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenize(text, special=True)
    assert llm.tokenize("<|im_start|>", special=True) == [151644]
    a = llm.generate(text, max_tokens=5, temperature=0)
    b = llm.generate(ids, max_tokens=5, temperature=0)
    assert a.token_ids == b.token_ids


def test_multi_turn_chat_reuses_cache(llm):
    msgs = [{"role": "user", "content": "My name is Ada. Reply with OK."}]
    r1 = llm.chat(msgs, max_tokens=10, temperature=0)
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "What is my name?"}]
    r2 = llm.chat(msgs, max_tokens=20, temperature=0)
    assert "Ada" in r2.text
    # the same conversation in a fresh context gives the same answer
    with orcd.Model(llm.path, device="cpu", n_ctx=1024) as fresh:
        assert fresh.chat(msgs, max_tokens=20, temperature=0).token_ids == r2.token_ids


def test_same_prompt_reuses_prefill_logits(tiny_model):
    """The same prompt twice: the second call takes the prompt's logits from the first
    (its K/V are still cached) instead of evaluating the last prompt token again through
    the single-token path, whose rounding on the GPU differs from the prompt path's
    (a sampled token could change): same prompt + seed -> same tokens. Any other prompt
    evaluates what is not cached."""
    m = orcd.Model(tiny_model("Q8_0"), device="cpu", n_ctx=128)
    calls, real = [], m._engine

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def forward(self, slot, ids, pos, all_logits):
            calls.append((slot, len(ids), pos))
            return real.forward(slot, ids, pos, all_logits)

    m._engine = Spy()
    ids = list(range(5, 17))
    kw = dict(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True)
    a = m.generate(ids, **kw)
    assert calls[0] == (0, 12, 0)
    calls.clear()
    b = m.generate(ids, **kw)
    assert a.token_ids == b.token_ids
    assert [c[1:] for c in calls] == [(1, 12 + i) for i in range(5)], calls  # no prompt token again
    calls.clear()
    m.generate(ids[:-1] + [99], max_tokens=1, temperature=0)
    assert calls == [(0, 1, 11)]
    calls.clear()
    m.generate(ids, max_tokens=1, temperature=0)  # the latest prefill was another prompt
    assert calls == [(0, 1, 11)]
    m.logits(ids[:3])  # a fresh context in slot 0
    calls.clear()
    m.generate(ids, max_tokens=1, temperature=0)
    assert calls == [(0, 9, 3)]


# ------------------------------------------------------------------ acceptance
def _transcript_path():
    d = os.environ.get("ORCD_TRANSCRIPTS") or os.path.join(os.path.dirname(__file__), "..", "build")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, "haiku_transcripts.txt")


def haiku_acceptance(llm, tries=5):
    """The anti-cheat test from the original spec; returns (passed, transcripts)."""
    transcripts = []
    for attempt in range(1, tries + 1):
        now = time.localtime()
        word = minute_word(now.tm_min)
        seed = time.time_ns() & 0x7FFFFFFF
        prompt = f"Write a haiku about GPU computing that includes the word '{word}'"
        out = llm.chat([{"role": "user", "content": prompt}], temperature=0.7, top_k=40, top_p=0.95, min_p=0.05,
                       seed=seed, max_tokens=100)
        ok = contains_word(out.text, word)
        transcripts.append(f"--- try {attempt} ({llm.device}) seed={seed} word={word!r} pass={ok}\n"
                           f"USER: {prompt}\nASSISTANT: {out.text}\n")
        if ok:
            # determinism: the same prompt and seed again gives identical tokens
            again = llm.chat([{"role": "user", "content": prompt}], temperature=0.7, top_k=40, top_p=0.95,
                             min_p=0.05, seed=seed, max_tokens=100)
            assert again.token_ids == out.token_ids
            return True, transcripts
    return False, transcripts


def test_haiku_acceptance(llm):
    passed, transcripts = haiku_acceptance(llm)
    text = "\n".join(transcripts)
    with open(_transcript_path(), "a") as f:
        f.write(text + "\n")
    print(text)
    assert passed, "no haiku contained the minute word in 5 tries:\n" + text


# ------------------------------------------------------------------ the same on the GPU
GREEDY_PROMPTS = [
    "Write a haiku about GPU computing",
    "def quicksort(arr):",
    "What is the capital of France?",
    "Explain what a KV cache is in one sentence.",
    "1, 1, 2, 3, 5, 8,",
]


@pytest.fixture(scope="module")
def gpu_llm(real_model_path):
    if not orcd.cuda_available():
        pytest.skip(f"no usable GPU: {orcd.cuda_status()}")
    with orcd.Model(real_model_path, device="cuda", n_ctx=1024) as m:
        yield m


@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_gpu_cli_greedy_text_equals_cpu(gpu_llm, real_model_path, prompt):
    """`orcd generate --chat` greedy: same text on the GPU as on the CPU (32 tokens)."""
    import subprocess
    import sys
    outs = {}
    for dev in ("cpu", "cuda"):
        p = subprocess.run([sys.executable, "-m", "orcd.cli", "generate", prompt, "--chat", "-m", real_model_path,
                            "--device", dev, "--temperature", "0", "--max-tokens", "32"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        outs[dev] = p.stdout
    assert outs["cuda"] == outs["cpu"]
    assert gpu_llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=32).text + "\n" == outs["cpu"]


def test_gpu_haiku_acceptance(gpu_llm):
    passed, transcripts = haiku_acceptance(gpu_llm)
    text = "\n".join(transcripts)
    with open(_transcript_path(), "a") as f:
        f.write(text + "\n")
    print(text)
    assert passed, "no haiku contained the minute word in 5 tries on the GPU:\n" + text


def test_stream_validates_at_the_call(llm):
    """A bad parameter raises when stream() is called, before any piece is produced."""
    with pytest.raises(ValueError, match="temperature"):
        llm.stream("hi", temperature=-1)
    with pytest.raises(ValueError, match="stop"):
        llm.stream_chat([{"role": "user", "content": "hi"}], stop=[""])
