"""`orcd bench-serve`: load-test any OpenAI-compatible server (orcd serve, llama.cpp's
llama-server, vLLM) with N concurrent streaming clients.

First each client sends --warmup short requests (16 tokens; not measured: they let the server
capture its kernels and graphs, as a long-running server would have). Then each client sends
--requests streamed POST /v1/completions one after another, each with
a prompt of --prompt-words words (different per request) and max_tokens generated with
ignore_eos at --temperature with --top-k / --top-p / --min-p sent explicitly (default 40 / 0.95 /
0.05, llama.cpp's defaults, which `orcd bench --batch` uses too: both servers then sample with the
same chain instead of each its own defaults; 0 / 1 / 0 turn them off), and
stream_options.include_usage (the token count comes from the usage chunk when the server sends
one, else from the number of text chunks).

Reported: aggregate generated tokens per second (all tokens / wall time from the first
request sent to the last one ended), time to first token (request sent -> first text
chunk) and time per output token ((last chunk - first chunk) / (tokens - 1), per request)
as p50 / p99 / mean, and errors: an HTTP error, a stream error event, a connection
failure, or a stream that ends without `data: [DONE]` (unterminated).

Standard library + aiohttp. Exit code 0 when at least one request succeeded.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import List, Optional

_WORDS = ("the quick brown fox jumps over a lazy dog while seven engineers measure how fast a small "
          "language model can answer many questions at once on one graphics card and write down every "
          "number they see in a notebook with a blue cover before lunch").split()


def make_prompt(n_words: int, tag: str) -> str:
    """A prompt of n_words words that starts with `tag` (so no two requests share a prompt)."""
    words = [f"Request {tag}:"]
    i = len(tag)
    while len(words) < n_words:
        words.append(_WORDS[i % len(_WORDS)])
        i += 7
    return " ".join(words[:max(n_words, 1)]) + "\nContinue the story:"


def percentile(values: List[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (NumPy's default); None when empty."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _stats_ms(values: List[float]) -> dict:
    def ms(x):
        return None if x is None else round(x * 1000.0, 3)

    return {"p50": ms(percentile(values, 50)), "p99": ms(percentile(values, 99)),
            "mean": ms(sum(values) / len(values) if values else None), "n": len(values)}


async def _one(session, url: str, body: dict, headers: dict, timeout: float) -> dict:
    import aiohttp

    t0 = time.perf_counter()
    t_first = t_last = None
    chunks = 0
    usage_tokens = None
    done = False
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                text = (await r.text())[:300]
                return {"error": f"HTTP {r.status}: {text}"}
            async for raw in r.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    return {"error": f"stream error: {json.dumps(obj['error'])[:300]}"}
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                for c in obj.get("choices") or ():
                    if c.get("text"):
                        now = time.perf_counter()
                        t_first = t_first if t_first is not None else now
                        t_last = now
                        chunks += 1
    except asyncio.TimeoutError:
        return {"error": f"timed out after {timeout:g} s"}
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop
        return {"error": f"{type(e).__name__}: {e}"}
    if not done:
        return {"error": "the stream ended without data: [DONE] (unterminated)"}
    tokens = usage_tokens if usage_tokens is not None else chunks
    out = {"tokens": tokens, "ttft": None if t_first is None else t_first - t0, "tpot": None}
    if t_first is not None and tokens > 1:
        out["tpot"] = (t_last - t_first) / (tokens - 1)
    return out


async def bench(url: str, clients: int = 1, requests: int = 1, max_tokens: int = 128, prompt_words: int = 100,
                temperature: float = 0.7, model: Optional[str] = None, api_key: Optional[str] = None,
                timeout: float = 600.0, warmup: int = 1, top_k: int = 40, top_p: float = 0.95,
                min_p: float = 0.05) -> dict:
    import aiohttp

    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A new connection for every request: a pooled keep-alive connection the server has closed
    # in the meantime (llama-server's HTTP library closes them) fails the next request on it
    # ("Server disconnected") before the server sees it; a localhost connect costs ~0.1 ms.
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        if model is None:
            async with session.get(url + "/v1/models", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {url}/v1/models: HTTP {r.status}: {(await r.text())[:300]}")
                model = (await r.json())["data"][0]["id"]

        def body(c: int, k, n_tokens: int) -> dict:
            return {"model": model, "prompt": make_prompt(prompt_words, f"{c}-{k}"), "max_tokens": n_tokens,
                    "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                    "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}

        async def client(c: int) -> List[dict]:
            return [await _one(session, url, body(c, k, max_tokens), headers, timeout) for k in range(requests)]

        async def warm(c: int) -> List[dict]:
            return [await _one(session, url, body(c, f"w{k}", 16), headers, timeout) for k in range(warmup)]

        warm_results = [r for rs in await asyncio.gather(*(warm(c) for c in range(clients))) for r in rs]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "url": url, "model": model, "clients": clients, "requests_per_client": requests,
        "warmup_requests": len(warm_results), "warmup_errors": sum(1 for r in warm_results if "error" in r),
        "max_tokens": max_tokens, "prompt_words": prompt_words, "temperature": temperature,
        "top_k": top_k, "top_p": top_p, "min_p": min_p,
        "requests": len(results), "completed": len(ok), "errors": len(errors), "error_samples": errors[:3],
        # wall_s to the µs, as the latencies (a tiny run takes a few ms)
        "wall_s": round(wall, 6), "generated_tokens": tokens,
        "tok_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": _stats_ms([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_ms": _stats_ms([r["tpot"] for r in ok if r["tpot"] is not None]),
    }


def format_text(r: dict) -> str:
    t, p = r["ttft_ms"], r["tpot_ms"]
    lines = [
        f"{r['url']}  model {r['model']}",
        f"{r['clients']} clients x {r['requests_per_client']} requests, {r['prompt_words']}-word prompts, "
        f"{r['max_tokens']} tokens each (ignore_eos, T={r['temperature']:g}, top_k {r['top_k']}, "
        f"top_p {r['top_p']:g}, min_p {r['min_p']:g})",
        f"completed {r['completed']}/{r['requests']}, errors {r['errors']} "
        f"(after {r['warmup_requests']} warm-up requests, {r['warmup_errors']} errors)",
        f"generated {r['generated_tokens']} tokens in {r['wall_s']:.2f} s: {r['tok_per_s']} tok/s aggregate",
        f"TTFT          p50 {t['p50']} ms  p99 {t['p99']} ms  mean {t['mean']} ms",
        f"per token     p50 {p['p50']} ms  p99 {p['p99']} ms  mean {p['mean']} ms",
    ]
    for e in r["error_samples"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def run(a) -> int:
    for name in ("clients", "requests", "max_tokens", "prompt_words"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    warmup = getattr(a, "warmup", 1)
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0 (got {warmup})")
    r = asyncio.run(bench(a.url, a.clients, a.requests, a.max_tokens, a.prompt_words, a.temperature,
                          a.model, a.api_key, a.timeout, warmup, getattr(a, "top_k", 40),
                          getattr(a, "top_p", 0.95), getattr(a, "min_p", 0.05)))
    print(json.dumps(r, indent=2) if a.json else format_text(r))
    sys.stdout.flush()
    return 0 if r["completed"] else 1
