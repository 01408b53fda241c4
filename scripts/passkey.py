#!/usr/bin/env python3
"""Pass-key retrieval at long contexts: does the model find a number hidden deep in filler?

Builds chat prompts of about --lengths tokens (default 8192 and 16384) of repeated filler
text with "The pass key is NNNNN. Remember it." inserted at several relative depths
(--depths, default 0.1 0.5 0.9), then asks for the pass key. Greedy answers from orcd
(--model, --device) and, with --url, from an OpenAI-compatible server (llama-server)
given the same messages, printed as JSON, one record per (length, depth):

  python scripts/passkey.py --model M.gguf --device cuda [--url http://127.0.0.1:8080]

Each record: length (target tokens), depth, prompt_tokens (orcd's count), key, and per
backend the answer text, whether it contains the key, and the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? Answer with the number only."


def build_messages(model, n_tokens: int, depth: float, key: int) -> list:
    """A user message of about n_tokens tokens (measured with the model's tokenizer)
    with the key sentence at `depth` (0 = start, 1 = end) of the filler."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    per = max(1, len(model.tokenize(FILLER)))
    budget = n_tokens - len(model.tokenize(needle + QUESTION)) - 64  # chat template and answer
    n_fill = max(1, budget // per)
    at = int(round(depth * n_fill))
    text = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            + FILLER * at + needle + FILLER * (n_fill - at) + "\n" + QUESTION)
    return [{"role": "user", "content": text}]


def ask_server(url: str, messages: list, max_tokens: int, timeout: float) -> str:
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                       "top_k": 1, "seed": 0}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read().decode())
    return out["choices"][0]["message"]["content"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: orcd's default model)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--url", default=None, help="an OpenAI-compatible server to ask the same prompts")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384], help="prompt sizes in tokens")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="key positions, 0..1")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=17, help="seed of the random keys")
    ap.add_argument("--timeout", type=float, default=600.0, help="server request timeout, seconds")
    a = ap.parse_args(argv)
    for d in a.depths:
        if not 0.0 <= d <= 1.0:
            ap.error(f"--depths must lie in [0, 1] (got {d})")
    if min(a.lengths) < 256:
        ap.error("--lengths must be at least 256 tokens")

    from orcd import Model

    rng = random.Random(a.seed)
    n_ctx = max(a.lengths) + a.max_tokens + 64
    records = []
    with Model(a.model, device=a.device, n_ctx=n_ctx) as m:
        for n in a.lengths:
            for d in a.depths:
                key = rng.randint(10000, 99999)
                msgs = build_messages(m, n, d, key)
                rec = {"length": n, "depth": d, "prompt_tokens": len(m.chat_ids(msgs)), "key": key}
                t0 = time.perf_counter()
                ans = m.chat(msgs, max_tokens=a.max_tokens, temperature=0.0).text
                rec["orcd"] = {"answer": ans, "found": str(key) in ans, "seconds": round(time.perf_counter() - t0, 3)}
                if a.url:
                    t0 = time.perf_counter()
                    try:
                        ans = ask_server(a.url, msgs, a.max_tokens, a.timeout)
                        rec["server"] = {"answer": ans, "found": str(key) in ans,
                                         "seconds": round(time.perf_counter() - t0, 3)}
                    except Exception as e:  # report and go on with the other prompts
                        rec["server"] = {"error": f"{type(e).__name__}: {e}"}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    found = sum(r["orcd"]["found"] for r in records)
    print(json.dumps({"orcd_found": found, "total": len(records)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
