"""`orcd bench-serve` against our own server (a tiny model): the JSON report's counts are
those of the run, and its statistics helpers agree with NumPy."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

from orcd.bench_serve import make_prompt, percentile  # noqa: E402
from test_server import Server  # noqa: E402


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        v = rng.random(n).tolist()
        for q in (0, 50, 99, 100):
            assert percentile(v, q) == pytest.approx(float(np.percentile(v, q)), rel=1e-12, abs=1e-15)
    assert percentile([], 50) is None


def test_prompt_has_the_words_asked_for():
    for n in (1, 5, 100):
        p = make_prompt(n, "3-1")
        assert len(p.split("\n")[0].split()) == n + 1  # "Request 3-1:" is two words
    assert make_prompt(20, "0-0") != make_prompt(20, "1-0")


def test_bench_serve_against_our_server(tiny_model, tmp_path):
    with Server(tiny_model("Q8_0"), "--n-ctx", "512", "--max-seqs", "4", log_dir=str(tmp_path)) as s:
        p = subprocess.run([sys.executable, "-m", "orcd.cli", "bench-serve", "--url", s.url, "--clients", "2",
                            "--requests", "1", "--warmup", "1", "--max-tokens", "8", "--prompt-words", "30",
                            "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        assert r["model"] == s.model_id and r["clients"] == 2
        assert r["requests"] == 2 and r["completed"] == 2 and r["errors"] == 0 and r["error_samples"] == []
        assert r["warmup_requests"] == 2 and r["warmup_errors"] == 0
        assert r["generated_tokens"] == 16  # ignore_eos: every request runs to max_tokens
        assert r["tok_per_s"] > 0 and r["wall_s"] > 0
        assert r["ttft_ms"]["n"] == 2 and 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] <= r["wall_s"] * 1000 + 1e-3  # both rounded to 1 µs
        assert r["tpot_ms"]["n"] == 2
        m = s.metrics()
        # the server saw the warm-up requests too (16 tokens each), the report did not count them
        assert m["orcd_generation_tokens_total"] == 16 + 2 * 16 and m['orcd_requests_total{outcome="length"}'] == 4
        # text output, and a server that is not there: every request an error, exit code 1
        p = subprocess.run([sys.executable, "-m", "orcd.cli", "bench-serve", "--url", s.url, "--clients", "1",
                            "--requests", "1", "--warmup", "0", "--max-tokens", "4", "--model", "no-such-model"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        assert p.returncode == 1 and "errors 1" in p.stdout and "HTTP 404" in p.stdout


def _one_request_per_connection_server():
    """A raw OpenAI-shaped SSE server on 127.0.0.1 that answers one request per connection
    and drops the connection, unanswered, when a second request arrives on it (a server that
    closes kept-alive connections, as llama-server's HTTP library does, seen from a client
    that reuses one: the request is lost). Returns (url, requests_answered, stop)."""
    import asyncio
    import threading

    answered = []
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    async def handle(reader, writer):
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if served:  # a reused connection: dropped without an answer
                    break
                lines = head.decode().split("\r\n")
                n = next((int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length:")), 0)
                if n:
                    await reader.readexactly(n)
                if lines[0].startswith("GET /v1/models"):
                    body = json.dumps({"data": [{"id": "fake"}]}).encode()
                    ctype = "application/json"
                else:
                    chunks = [{"choices": [{"text": f" t{i}"}]} for i in range(4)]
                    chunks.append({"choices": [], "usage": {"completion_tokens": 4}})
                    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"
                    ctype = "text/event-stream"
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                             f"Connection: keep-alive\r\n\r\n".encode() + body)
                await writer.drain()
                served += 1
                answered.append(lines[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def run():
        asyncio.set_event_loop(loop)
        box["server"] = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    port = box["server"].sockets[0].getsockname()[1]

    def stop():
        loop.call_soon_threadsafe(box["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return f"http://127.0.0.1:{port}", answered, stop


def test_bench_serve_opens_a_connection_per_request():
    """Against a server that drops reused connections, every request still arrives and
    completes: bench-serve does not reuse pooled connections (a lost request would count as an
    error of the server under test, as round 8's llama-server runs did)."""
    import asyncio

    from orcd.bench_serve import bench

    url, answered, stop = _one_request_per_connection_server()
    try:
        r = asyncio.run(bench(url, clients=2, requests=3, max_tokens=4, prompt_words=5, warmup=1, timeout=30))
    finally:
        stop()
    assert (r["errors"], r["warmup_errors"], r["completed"]) == (0, 0, 6), r
    assert r["generated_tokens"] == 24
    assert sum(1 for a in answered if a.startswith("POST /v1/completions")) == 8  # 2 warm-up + 6
