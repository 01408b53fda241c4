"""`orcd chat`'s REPL (orcd.chat_cli.ChatREPL) driven by scripted input on the real model, CPU:
commands, trimming to n_ctx, the max_tokens marker, Ctrl-C during an answer and at the prompt."""
from __future__ import annotations

import io

import pytest

import orcd
from orcd.chat_cli import ChatREPL, banner

SYSTEM = "You are a terse assistant."


@pytest.fixture(scope="module")
def llm(real_model_path):
    with orcd.Model(real_model_path, device="cpu", n_ctx=1024) as m:
        yield m


def _repl(llm, script, max_tokens=8, system=SYSTEM, **kw):
    out, err = io.StringIO(), io.StringIO()
    p = orcd.SamplingParams(temperature=0, max_tokens=max_tokens)
    r = ChatREPL(llm, p, system=system, out=out, err=err, inp=io.StringIO(script), **kw)
    return r, out, err


def test_answers_keep_the_conversation_and_reset_empties_it(llm):
    r, out, err = _repl(llm, "My name is Ada. Reply OK.\nWhat is my name?\n/reset\n", max_tokens=12)
    assert r.run() == 0
    assert r.turns == [], "/reset emptied the conversation"
    assert r.messages() == [{"role": "system", "content": SYSTEM}], "/reset keeps the system prompt"
    assert "Ada" in out.getvalue().split("\n", 1)[1], out.getvalue()
    assert "[conversation cleared, system prompt kept]" in err.getvalue()
    # the first answer equals Model.chat on the same conversation (independent of the REPL's bookkeeping)
    want = llm.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "My name is Ada. Reply OK."}],
                    temperature=0, max_tokens=12).text
    assert out.getvalue().startswith(want + "\n")


def test_after_reset_the_model_does_not_remember(llm):
    r, out, _ = _repl(llm, "My name is Ada. Reply OK.\n/reset\n", max_tokens=12)
    r.run()
    assert r.turns == []
    t = r.ask("What is my name? If you do not know, reply: unknown.")
    assert t is not None and "Ada" not in t.answer


def test_commands_help_exit_unknown(llm):
    r, out, err = _repl(llm, "/help\n/frobnicate\n/exit\nnever sent\n")
    assert r.run() == 0
    e = err.getvalue()
    assert "/reset" in e and "/exit" in e and "[unknown command /frobnicate" in e
    assert r.turns == [] and out.getvalue() == "", "nothing after /exit was sent"


def test_banner_names_model_quant_context_and_device(llm):
    b = banner(llm)
    assert "Qwen2.5 Coder 0.5B Instruct" in b and "Q4_K_M" in b and "n_ctx 1024" in b and "32768" in b
    assert "on cpu" in b


def test_cut_at_max_tokens_is_marked(llm):
    r, out, err = _repl(llm, "Write a long poem about the sea, at least twenty lines.\n", max_tokens=5)
    r.run()
    assert "[cut at max_tokens=5]" in err.getvalue()
    assert r.turns[0].note == "max_tokens"
    assert len(llm.tokenize(r.turns[0].answer)) <= 6
    r, out, err = _repl(llm, "Reply with the single word: yes\n", max_tokens=20)
    r.run()
    assert "[cut" not in err.getvalue() and r.turns[0].note == ""


def test_a_conversation_longer_than_n_ctx_drops_the_oldest_turns(real_model_path):
    questions = [f"Say the number {i} and nothing else." for i in range(12)]
    with orcd.Model(real_model_path, device="cpu", n_ctx=160) as small:
        r, out, err = _repl(small, "".join(q + "\n" for q in questions), max_tokens=6)
        assert r.run() == 0
        notes = [l for l in err.getvalue().splitlines() if "outgrew n_ctx=160" in l]
        assert notes, err.getvalue()
        assert all(l.count("\n") == 0 and "dropped the oldest" in l for l in notes)
        assert len(out.getvalue().splitlines()) == len(questions), "every question was answered"
        assert 0 < len(r.turns) < len(questions)
        assert r.turns[-1].user == questions[-1]
        assert [t.user for t in r.turns] == questions[-len(r.turns):], "the oldest ones went"
        msgs = r.messages()
        assert msgs[0] == {"role": "system", "content": SYSTEM}
        assert len(small.chat_ids(msgs)) <= 160
        # a message that cannot fit even alone is refused; the conversation stays
        kept = list(r.turns)
        assert r.ask("word " * 400) is None
        assert r.turns == kept and "[message not sent" in err.getvalue()


class _InterruptingModel:
    """The real model, whose token stream raises KeyboardInterrupt (Ctrl-C) after `after` pieces."""

    def __init__(self, llm, after):
        self.llm, self.after, self.closed = llm, after, 0

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def stream(self, ids, params):
        inner = self.llm.stream(ids, params)
        outer = self

        class Stream:
            finish_reason = None
            token_ids = ()

            def __iter__(self):
                for i, piece in enumerate(inner):
                    if i == outer.after:
                        raise KeyboardInterrupt
                    yield piece

            def close(self):
                outer.closed += 1
                inner.close()
        return Stream()


def test_ctrl_c_during_an_answer_keeps_the_partial_answer_and_the_session(llm):
    m = _InterruptingModel(llm, after=3)
    r, out, err = _repl(m, "Count from 1 to 50, separated by spaces.\n", max_tokens=40)
    assert r.run() == 0
    assert "[interrupted]" in err.getvalue()
    assert m.closed == 1, "the generation was stopped (its slot freed)"
    t = r.turns[0]
    assert t.note == "interrupted" and t.answer and out.getvalue() == t.answer + "\n"
    assert r.messages()[-1] == {"role": "assistant", "content": t.answer}
    # the session goes on: the next question is answered with the partial turn in the conversation
    m.after = 10 ** 9
    t2 = r.ask("Reply with the single word: yes")
    assert t2 is not None and t2.note == "" and t2.answer.strip()
    assert len(r.turns) == 2
    assert all(slot.users == 0 for slot in llm._slots), "no generation holds a cache slot"


def _reader(events):
    """read_line from a script: strings are lines, KeyboardInterrupt raises it; then EOF."""
    it = iter(events)

    def read(prompt):
        try:
            e = next(it)
        except StopIteration:
            raise EOFError from None
        if e is KeyboardInterrupt:
            raise KeyboardInterrupt
        return e
    return read


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_quits(llm):
    r, out, err = _repl(llm, "", read_line=_reader([KeyboardInterrupt, "/help", KeyboardInterrupt, KeyboardInterrupt,
                                                    "not read"]))
    assert r.run() == 0
    assert err.getvalue().count("line cleared") == 2, "each first Ctrl-C only clears the line"
    assert r.turns == [] and "/reset" in err.getvalue()
    read = _reader([KeyboardInterrupt, "Reply with the single word: yes", KeyboardInterrupt, "/exit"])
    r, out, err = _repl(llm, "", read_line=read)
    assert r.run() == 0 and len(r.turns) == 1, "a line between two Ctrl-C keeps the session"


def test_ctrl_d_quits(llm):
    r, out, err = _repl(llm, "", read_line=_reader([]))
    assert r.run() == 0 and r.turns == []


def test_readline_history_is_kept_and_bounded(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    from orcd import chat_cli

    monkeypatch.setenv("ORCD_CACHE", str(tmp_path))
    path = chat_cli.history_path()
    assert path.startswith(str(tmp_path))
    readline.clear_history()
    try:
        save = chat_cli.setup_readline()
        for i in range(chat_cli.HISTORY_LINES + 50):
            readline.add_history(f"question {i}")
        save()
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [l for l in f.read().splitlines() if l and not l.startswith("_HiStOrY_V2_")]
        assert len(lines) == chat_cli.HISTORY_LINES
        assert lines[-1].replace("\\040", " ") == f"question {chat_cli.HISTORY_LINES + 49}"
        readline.clear_history()
        chat_cli.setup_readline()  # a new session reads it back
        n = readline.get_current_history_length()
        assert n == chat_cli.HISTORY_LINES and readline.get_history_item(n) == f"question {chat_cli.HISTORY_LINES + 49}"
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00 not a history file")
        chat_cli.setup_readline()()  # an unreadable history does not stop the chat
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        monkeypatch.setenv("ORCD_CACHE", str(blocker))
        chat_cli.setup_readline()()  # nor does an unwritable cache
    finally:
        readline.clear_history()
