"""Model.generate with a list of prompts: a list of Completions in input order, run
together through the batch runner, each equal to the single-prompt generate (the
reference: Model's own one-at-a-time loop) on the real model (CPU)."""
import pytest

import orcd
from orcd import model as model_mod

PROMPTS = ["def add(a, b):", "The capital of France is", "# A haiku about rain\n"]


@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=256) as m:
        yield m


def _same(got, want):
    assert isinstance(got, orcd.Completion)
    assert (got.text, got.token_ids, got.finish_reason, got.usage) == \
        (want.text, want.token_ids, want.finish_reason, want.usage)


def test_greedy_batch_equals_single(llm):
    outs = llm.generate(PROMPTS, max_tokens=12, temperature=0)
    assert isinstance(outs, list) and len(outs) == len(PROMPTS)
    for prompt, got in zip(PROMPTS, outs):
        _same(got, llm.generate(prompt, max_tokens=12, temperature=0))


def test_sampled_batch_equals_single_with_seed(llm):
    kw = dict(max_tokens=12, temperature=0.9, top_k=30, top_p=0.9, seed=1234, repetition_penalty=1.1)
    outs = llm.generate(PROMPTS, **kw)
    for prompt, got in zip(PROMPTS, outs):
        _same(got, llm.generate(prompt, **kw))
    assert len({o.text for o in outs}) == len(PROMPTS)


def test_token_id_lists_and_eos_and_stop_strings(llm):
    chat_ids = llm.chat_ids([{"role": "user", "content": "What is 2+2? Reply with the number only."}])
    ids = [llm.tokenize(PROMPTS[0]), chat_ids]
    outs = llm.generate(ids, max_tokens=20, temperature=0)
    for prompt, got in zip(ids, outs):
        _same(got, llm.generate(prompt, max_tokens=20, temperature=0))
    assert outs[1].finish_reason == "stop"  # ended by the end-of-turn token, not included
    # stop strings: cut as generate cuts them, finish_reason "stop"
    greedy = outs[0].text
    stop = greedy[4:7]
    cut = llm.generate([PROMPTS[0], PROMPTS[1]], max_tokens=20, temperature=0, stop=stop)
    assert cut[0].text == greedy[: greedy.index(stop)] and cut[0].finish_reason == "stop"
    _same(cut[0], llm.generate(PROMPTS[0], max_tokens=20, temperature=0, stop=stop))
    _same(cut[1], llm.generate(PROMPTS[1], max_tokens=20, temperature=0, stop=stop))


def test_more_prompts_than_slots_keep_their_order(llm):
    n = model_mod.MAX_BATCH_SLOTS + 2
    prompts = [f"{i} + {i} =" for i in range(n)]
    outs = llm.generate(prompts, max_tokens=3, temperature=0)
    assert len(outs) == n
    for prompt, got in zip(prompts, outs):
        _same(got, llm.generate(prompt, max_tokens=3, temperature=0))


def test_flat_int_list_is_one_prompt_and_bad_batches(llm):
    ids = llm.tokenize(PROMPTS[0])
    one = llm.generate(ids, max_tokens=4, temperature=0)
    assert isinstance(one, orcd.Completion) and one.usage.prompt_tokens == len(ids)
    with pytest.raises(TypeError, match="prompt"):
        llm.generate(["ok", 5], max_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2], [llm.n_vocab]], max_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["ok", ""], max_tokens=2)
