"""Fuzz target: orcd's tokenizer and chat-template encoding on arbitrary text.

    python tests/fuzz/fuzz_tokenizer.py [atheris/libFuzzer flags] [CORPUS_DIR ...]
        with atheris installed: coverage-guided (e.g. -max_total_time=60)
    python tests/fuzz/fuzz_tokenizer.py --random SECONDS [CORPUS_DIR ...]
        without atheris: a seeded random-mutation driver over the corpus files

The tokenizer is built from a tiny model's metadata (tests/tiny_models.py:
256 byte tokens, BPE merges, ChatML control tokens) and the chat template is
that model's ChatML. Properties checked for every input:
  - encode(text) never raises for text without lone surrogates, and
    decode(encode(text)) == text (the tokenizer's documented round trip);
  - encode(text, special=True) raises nothing but ValueError;
  - decoding any in-range ids raises nothing; out-of-range ids raise ValueError;
  - encode_chat(messages built from the input) decodes to the template's
    rendering, and the only control tokens in it are the template's own
    (one <|im_start|> per message plus one for the generation prompt), so
    control-token text in contents or roles never becomes a control token.
A violated property or any other exception is a finding; crashes found are
saved as regressions/tokenizer/<name> and replayed by
tests/test_native_reliability.py.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny_models

_STATE = {}


def _setup():
    if _STATE:
        return _STATE
    import orcd
    from orcd.chat import ChatTemplate
    from orcd.tokenizer import Tokenizer
    from tiny_models import CHATML_TEMPLATE, write_tiny_qwen2

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny_qwen2(os.path.join(d, "tok.gguf"), "F32", n_layer=1)
        with orcd.GGUFFile(path) as f:
            md = {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_metadata(md)
    _STATE.update(tok=tok, template=ChatTemplate(CHATML_TEMPLATE),
                  im_start=tok.token_to_id("<|im_start|>"), n=tok.n_vocab)
    return _STATE


def _text(data: bytes) -> str:
    """Any bytes -> a str without lone surrogates (invalid UTF-8 replaced)."""
    return data.decode("utf-8", errors="replace")


def test_one_input(data: bytes) -> None:
    from orcd.chat import encode_chat

    s = _setup()
    tok, n = s["tok"], s["n"]
    text = _text(data)

    ids = tok.encode(text)
    assert all(0 <= i < n for i in ids), ids
    assert tok.decode(ids) == text, (text, ids)
    try:
        tok.encode(text, special=True)
    except ValueError:
        pass

    # ids from the raw bytes: in range decode, out of range is ValueError
    raw_ids = [b * 7 % n for b in data[:64]]
    tok.decode(raw_ids)
    tok.decode(raw_ids, skip_special=True)
    if data:
        try:
            tok.decode([n + data[0]])
            raise AssertionError("an out-of-range id decoded")
        except ValueError:
            pass

    # a conversation: the text split into roles and contents
    parts = text.split("\n")
    msgs = []
    for k in range(0, min(len(parts), 8), 2):
        role = parts[k] or "user"
        content = parts[k + 1] if k + 1 < len(parts) else ""
        msgs.append({"role": role, "content": content})
    add_gen = bool(data[:1]) and data[0] % 2 == 0
    chat_ids = encode_chat(tok, s["template"], msgs, add_generation_prompt=add_gen)
    rendered = s["template"].render(msgs, add_generation_prompt=add_gen)
    assert tok.decode(chat_ids) == rendered, (msgs, rendered, tok.decode(chat_ids))
    assert chat_ids.count(s["im_start"]) == len(msgs) + add_gen, (msgs, chat_ids)


def _corpus_files(dirs):
    files = []
    for d in dirs:
        if os.path.isfile(d):
            files.append(d)
        elif os.path.isdir(d):
            files.extend(os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith("."))
    return files


def replay(dirs) -> int:
    """Runs every file of `dirs` once; returns how many ran (raises on a finding)."""
    files = _corpus_files(dirs)
    for f in files:
        with open(f, "rb") as fh:
            test_one_input(fh.read())
    return len(files)


def _mutate(rng: random.Random, b: bytes, pool) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            b.insert(rng.randint(0, len(b)), rng.randrange(256))
        elif op == 2 and b:
            del b[rng.randrange(len(b))]
        elif op == 3 and pool:  # splice from another input
            o = rng.choice(pool)
            i = rng.randint(0, len(o))
            b[rng.randint(0, len(b)):rng.randint(0, len(b))] = o[i:i + rng.randint(1, 32)]
        elif op == 4:  # interesting text
            t = rng.choice(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n", "\u00e9", "\U0001F600",
                            "\r\n", "  ", "'s", "123", "\ufffd", "\ue000", "\x00"]).encode()
            i = rng.randint(0, len(b))
            b[i:i] = t
        elif op == 5 and len(b) > 1:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 16)]
    return bytes(b[:4096])


def random_driver(seconds: float, dirs, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = [open(f, "rb").read() for f in _corpus_files(dirs)] or [b""]
    t0, n = time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        data = _mutate(rng, rng.choice(pool), pool)
        try:
            test_one_input(data)
        except Exception:
            os.makedirs(os.path.join(HERE, "regressions", "tokenizer"), exist_ok=True)
            out = os.path.join(HERE, "regressions", "tokenizer", f"random-{seed}-{n}")
            with open(out, "wb") as fh:
                fh.write(data)
            print(f"finding after {n} inputs, saved as {out}: {data!r}", file=sys.stderr)
            raise
        if len(pool) < 1000 and rng.random() < 0.05:
            pool.append(data)
        n += 1
    print(f"random driver: {n} inputs in {time.monotonic() - t0:.0f} s, no findings")


def main(argv) -> None:
    if argv[1:2] == ["--random"]:
        random_driver(float(argv[2]), argv[3:] or [os.path.join(HERE, "corpus", "tokenizer")])
        return
    import atheris

    with atheris.instrument_imports():
        import orcd.chat  # noqa: F401
        import orcd.tokenizer  # noqa: F401
    _setup()  # outside the fuzzed function: building the tokenizer is not the target
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
