"""`orcd chat`: the interactive conversation, as a REPL over Model.chat_ids + Model.stream.

ChatREPL reads lines from a text stream or a line-reading function and writes to text
streams, so tests drive it without a terminal; `orcd chat` gives it `input()` with
readline (history, line editing) when stdin is a terminal.

- Answers go to `out`; the banner, notices and markers to `err` (the same terminal when
  interactive; with stdout redirected, stdout holds only the answers).
- Commands: /help, /reset (forget the conversation, keep the system prompt), /exit
  (also /quit, Ctrl-D, end of input).
- Ctrl-C while an answer streams stops it; the part written so far stays in the
  conversation as the assistant's turn (Turn.note "interrupted", "[interrupted]" shown).
  Ctrl-C at the prompt clears the line; a second one in a row quits.
- A conversation that no longer fits in n_ctx (with ANSWER_RESERVE of room for the
  answer) loses its oldest turns, system prompt kept, and one line says so. A message
  that cannot fit even alone is not sent, and the conversation stays as it was.
- An answer cut by max_tokens ends with "[cut at max_tokens=N]".

Bounds: the readline history file keeps HISTORY_LINES lines.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, TextIO

HISTORY_LINES = 1000
HISTORY_FILE = "chat_history"
ANSWER_RESERVE = 0.5  # at most this share of n_ctx is kept free for the answer (and at most max_tokens)

HELP = """\
/help    this help
/reset   forget the conversation (the system prompt stays)
/exit    quit (also /quit, Ctrl-D)
Ctrl-C   while an answer is written: stop it (the part written stays in the conversation);
         at the prompt: clear the line (twice in a row: quit)"""

# general.file_type values (llama.cpp's llama_ftype) of the common quantizations.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass
class Turn:
    """One exchange: the user's message and the answer as far as it was written.
    note: "" (complete), "interrupted" (Ctrl-C), "max_tokens" or "context" (cut)."""
    user: str
    answer: str = ""
    note: str = ""


def quant_name(llm) -> str:
    """The file's quantization (general.file_type), else its most common tensor type."""
    ft = llm.metadata.get("general.file_type")
    if isinstance(ft, int) and ft in _FILE_TYPES:
        return _FILE_TYPES[ft]
    types = [t.type for t in llm.file.tensors]
    return max(set(types), key=types.count) if types else "?"


def banner(llm) -> str:
    info = getattr(llm, "info", {}) or {}
    name = llm.metadata.get("general.name") or info.get("name") or os.path.basename(llm.path)
    trained = info.get("n_ctx_train")
    ctx = f"n_ctx {llm.n_ctx}" + (f" (trained {trained})" if trained else "")
    if llm.device == "cuda":
        where = "cuda" + (f" ({info.get('device_name') or info.get('device')})"
                          if info.get("device_name") or info.get("device") else "")
    else:
        where = "cpu" + (f", {llm.n_threads} threads" if llm.n_threads else "")
    return f"orcd chat: {name}, {quant_name(llm)}, {ctx}, on {where}\n/help for commands, /exit or Ctrl-D to quit"


class ChatREPL:
    """The chat loop. llm: an orcd.Model (chat_ids, stream, n_ctx); params: SamplingParams.
    Input: read_line(prompt) -> str (EOFError at the end, KeyboardInterrupt for Ctrl-C),
    or else lines of `inp` (default sys.stdin)."""

    def __init__(self, llm, params, system: Optional[str] = None, out: Optional[TextIO] = None,
                 err: Optional[TextIO] = None, inp: Optional[TextIO] = None,
                 read_line: Optional[Callable[[str], str]] = None, prompt: str = ""):
        self.llm = llm
        self.params = params
        self.system = system
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._inp = inp or sys.stdin
        self._read_line = read_line
        self.prompt = prompt
        self.turns: List[Turn] = []

    # ------------------------------------------------------------ conversation
    def messages(self, pending: Optional[str] = None, turns: Optional[List[Turn]] = None) -> List[dict]:
        """The conversation as chat messages (plus `pending` as the last user message)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for t in self.turns if turns is None else turns:
            msgs.append({"role": "user", "content": t.user})
            msgs.append({"role": "assistant", "content": t.answer})
        if pending is not None:
            msgs.append({"role": "user", "content": pending})
        return msgs

    def reset(self) -> None:
        self.turns = []

    def _reserve(self) -> int:
        n_ctx = self.llm.n_ctx
        cap = int(n_ctx * ANSWER_RESERVE)
        mt = self.params.max_tokens
        return min(mt, cap) if mt else cap

    def _fit(self, text: str):
        """(prompt ids, turns to drop) for `text` after the conversation, dropping the fewest
        oldest turns that leave the answer its reserve; None when `text` cannot fit at all."""
        n_ctx, reserve = self.llm.n_ctx, self._reserve()
        if len(text.encode("utf-8", "surrogatepass")) > self.llm.max_prompt_bytes:
            return None
        for k in range(len(self.turns) + 1):
            ids = self._ids(text, k)
            if len(ids) + reserve <= n_ctx:
                return ids, k
        # even alone it leaves less than the reserve: send it if it fits at all
        return (ids, len(self.turns)) if len(ids) < n_ctx else None

    def _ids(self, text: str, k: int) -> List[int]:
        """Prompt ids of the conversation without its k oldest turns, then `text`."""
        from .chat import encode_chat

        return encode_chat(self.llm.tokenizer, self.llm.chat_template, self.messages(text, self.turns[k:]))

    def say(self, text: str) -> None:
        """One line for the user (on err)."""
        self.err.write(text + "\n")
        self.err.flush()

    def ask(self, text: str) -> Optional[Turn]:
        """Sends `text`, streams the answer to out; the Turn as kept (None: not sent)."""
        fit = self._fit(text)
        if fit is None:
            self.say(f"[message not sent: it does not fit in n_ctx={self.llm.n_ctx} tokens]")
            return None
        ids, drop = fit
        if drop:
            del self.turns[:drop]
            self.say(f"[the conversation outgrew n_ctx={self.llm.n_ctx}: dropped the oldest "
                     f"{drop} turn{'s' if drop > 1 else ''}{', kept the system prompt' if self.system else ''}]")
        stream = self.llm.stream(ids, self.params)
        turn = Turn(text)
        self.turns.append(turn)
        parts = []
        try:
            for piece in stream:
                parts.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            turn.note = "interrupted"
        finally:
            turn.answer = "".join(parts)
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self.out.write("\n")
        self.out.flush()
        if turn.note == "interrupted":
            self.say("[interrupted]")
        elif getattr(stream, "finish_reason", None) == "length":
            n = len(getattr(stream, "token_ids", ()))
            mt = self.params.max_tokens
            if mt is not None and n >= mt:
                turn.note = "max_tokens"
                self.say(f"[cut at max_tokens={mt}]")
            else:
                turn.note = "context"
                self.say(f"[cut: the context is full (n_ctx={self.llm.n_ctx})]")
        return turn

    # ------------------------------------------------------------ the loop
    def read(self) -> str:
        if self._read_line is not None:
            return self._read_line(self.prompt)
        line = self._inp.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n").rstrip("\r")

    def handle(self, line: str) -> bool:
        """One input line; False when it asks to quit."""
        s = line.strip()
        if not s:
            return True
        if s.startswith("/") and s[1:].split(" ", 1)[0].isalpha():
            cmd = s[1:].split(" ", 1)[0].lower()
            if cmd in ("exit", "quit"):
                return False
            if cmd == "help":
                self.say(HELP)
            elif cmd == "reset":
                self.reset()
                self.say("[conversation cleared" + (", system prompt kept]" if self.system else "]"))
            else:
                self.say(f"[unknown command /{cmd}: /help lists them]")
            return True
        try:
            self.ask(line)
        except KeyboardInterrupt:  # before the answer started: nothing was added
            self.out.write("\n")
            self.say("[interrupted]")
        except ValueError as e:  # this message only (a template refusing it, ...): the session goes on
            self.say(f"[error: {e}]")
        return True

    def run(self, show_banner: bool = True) -> int:
        if show_banner:
            self.say(banner(self.llm))
        interrupted = False
        while True:
            try:
                line = self.read()
            except EOFError:
                if self._read_line is not None:  # Ctrl-D: end the prompt's line
                    self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    self.out.write("\n")
                    return 0
                interrupted = True
                self.out.write("\n")
                self.say("[Ctrl-C: line cleared; Ctrl-C again, /exit or Ctrl-D quits]")
                continue
            interrupted = False
            if not self.handle(line):
                return 0


# ---------------------------------------------------------------- terminal setup

def history_path() -> str:
    from .default_model import cache_dir

    return os.path.join(cache_dir(create=False), HISTORY_FILE)


def setup_readline(path: Optional[str] = None) -> Callable[[], None]:
    """Loads readline (line editing, arrow keys) and the history file; returns the function
    that saves the history (at most HISTORY_LINES lines). Without readline: does nothing."""
    try:
        import readline
    except ImportError:
        return lambda: None
    path = path or history_path()
    readline.set_history_length(HISTORY_LINES)
    try:
        readline.read_history_file(path)
    except (OSError, ValueError):  # none yet, unreadable, or not a history file
        pass

    def save() -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # what was typed is the user's own
        except OSError:  # an unwritable cache only loses the history
            pass
    return save


def run_cli(llm, params, system: Optional[str] = None) -> int:
    """`orcd chat`: the REPL on the terminal (readline, ">>> " prompt) or on piped stdin."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not interactive:
        return ChatREPL(llm, params, system).run()
    save = setup_readline()
    try:
        return ChatREPL(llm, params, system, read_line=input, prompt=">>> ").run()
    finally:
        save()
