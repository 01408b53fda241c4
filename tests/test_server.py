"""`orcd serve` over HTTP: every server is a subprocess on 127.0.0.1 with a free port,
waited for with bounded waits and always terminated.

References are independent of the server: orcd.Model (the single-sequence engine path,
its own sampler loop and detokenization) for greedy and seeded texts, the GGUF file for
/health's fields, and text operations for stop strings. The OpenAI routes are driven by
the official `openai` client, the worker API by raw HTTP (httpx).

Models: a tiny random model (fast) for most tests; a "slow" tiny model (wider, ~ms per
token on one thread) where a stream must still be running when the test acts on it
(cancel, disconnect, SIGTERM, a full queue); the real model for the haiku over HTTP.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

import orcd  # noqa: E402

START_TIMEOUT = 90.0   # seconds for a server to become ready (the real model assembles on first use)
STOP_TIMEOUT = 20.0


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`orcd serve` in a subprocess (stderr to a log file). Use as a context manager, or
    call stop(); the process is killed if it does not exit after SIGTERM."""

    def __init__(self, model_path: str, *args: str, log_dir: str, wait: bool = True, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_path = model_path
        self.model_id = os.path.splitext(os.path.basename(model_path))[0]
        self.log_path = os.path.join(log_dir, f"serve-{self.port}.log")
        self._log = open(self.log_path, "wb")
        # ORCD_TEST_SERVER_DEVICE=cuda: the same tests against a server on the GPU (the haiku over HTTP)
        device = os.environ.get("ORCD_TEST_SERVER_DEVICE", "cpu")
        cmd = [sys.executable, "-m", "orcd.cli", "serve", "-m", model_path, "--device", device,
               "--port", str(self.port), "--threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=log_dir)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-4000:]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2.0)
                if r.status_code == 200 and r.json()["status"] == "ok":
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def client(self, api_key: str = "none", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60.0, **kw)

    def metrics(self) -> dict:
        """{name or name{labels}: value} of GET /metrics."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10.0).text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Polls /metrics until no generation is running or waiting; returns the metrics."""
        t0 = time.monotonic()
        while True:
            m = self.metrics()
            if m["orcd_requests_running"] == 0 and m["orcd_requests_waiting"] == 0:
                return m
            assert time.monotonic() - t0 < timeout, f"still running/waiting after {timeout} s: {m}"
            time.sleep(0.02)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def sse(lines):
    """(event name or None, data str) per server-sent event of an iterable of lines."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:][1:] if line[5:6] == " " else line[5:])
    if data:
        yield event, "\n".join(data)


def execute(url: str, body: dict, headers=None, timeout: float = 60.0):
    """POST /execute to its end: (status, [(event, data dict)]) or (status, error body)."""
    with httpx.stream("POST", url + "/execute", json=body, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()
        return 200, [(e, json.loads(d)) for e, d in sse(r.iter_lines())]


def check_execute_events(events):
    """Asserts the /execute contract; returns (joined text, terminal event)."""
    names = [e for e, _ in events]
    assert names[0] == "started", names
    assert all(n == "token" for n in names[1:-1]), names
    assert names[-1] in ("end", "error") and sum(n in ("end", "error") for n in names) == 1, names
    toks = [d for e, d in events if e == "token"]
    assert [d["i"] for d in toks] == list(range(len(toks)))
    return "".join(d["t"] for d in toks), events[-1]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return str(tmp_path_factory.mktemp("serve_logs"))


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return tiny_model("Q8_0")


@pytest.fixture(scope="module")
def slow_path(tiny_model):
    # wider and deeper: a few ms per token on one thread, so streams last while a test acts
    return tiny_model("Q8_0", n_embd=512, n_ff=2048, n_layer=4)


@pytest.fixture(scope="module")
def ref(tiny_path):
    m = orcd.Model(tiny_path, device="cpu", n_ctx=512)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(tiny_path, logs):
    with Server(tiny_path, "--n-ctx", "512", "--max-seqs", "32", "--max-queue", "512", log_dir=logs) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server(slow_path, logs):
    with Server(slow_path, "--n-ctx", "4096", "--max-seqs", "4", log_dir=logs) as s:
        yield s


GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)


# ------------------------------------------------------------------ encodings (no server)
TRICKY = ["", "a", 'quote " and \\ backslash', "new\nline\r\t", "\u2028\u2029", "caf\u00e9 \U0001F600 \ufffd",
          "\x00\x1f", "\ue000orcd-text\ue001", "</script>", "next\x85line", "\x0b\x0c\x1c\x1d\x1e"]


def test_fast_event_encodings_equal_the_builders():
    from orcd import openai_format as fmt
    from orcd.server.worker_api import _token_event

    for chat in (True, False):
        for usage in (True, False):
            def build(text):
                return (fmt.chat_chunk("chatcmpl-1", 5, "m", 3, content=text, with_usage_field=usage) if chat
                        else fmt.completion_chunk("cmpl-1", 5, "m", 3, text, with_usage_field=usage))

            ev = fmt.TextEvents(build(fmt.TextEvents.MARK))
            for t in TRICKY:
                assert ev(t) == fmt.sse_data(build(t))
                assert json.loads(ev(t)[len(b"data: "):])["choices"][0]["text" if not chat else "delta"] == (
                    t if not chat else {"content": t})
    for i, t in enumerate(TRICKY):
        assert _token_event(t, i * 37) == fmt.sse_event("token", {"t": t, "i": i * 37})
    with pytest.raises(ValueError, match="MARK"):
        fmt.TextEvents({"no": "mark"})


def test_events_survive_clients_that_split_lines_like_str_splitlines():
    """A piece holding U+0085, U+2028 or U+2029 (raw JSON allows them) once cut its event's data
    line in two for httpx's iter_lines, which ends lines where str.splitlines() does: the JSON
    arrived broken (CI, test_sigterm_with_requests_in_flight on random tokens). Every encoder
    escapes them; each event then parses whole through httpx's own line decoder."""
    from httpx._decoders import LineDecoder

    from orcd import openai_format as fmt
    from orcd.server.worker_api import _token_event

    ev = fmt.TextEvents(fmt.completion_chunk("cmpl-1", 5, "m", 0, fmt.TextEvents.MARK))
    for t in TRICKY:
        for raw, get in ((_token_event(t, 3), lambda d: d["t"]), (fmt.sse_event("token", {"t": t}), lambda d: d["t"]),
                         (fmt.sse_data({"t": t}), lambda d: d["t"]), (ev(t), lambda d: d["choices"][0]["text"])):
            lines = LineDecoder().decode(raw.decode("utf-8"))
            events = list(sse(lines))
            assert len(events) == 1, (t, lines)
            assert get(json.loads(events[0][1])) == t


# ------------------------------------------------------------------ health, models, metrics
def test_health_models_metrics(server, tiny_path):
    h = httpx.get(server.url + "/health", timeout=10).json()
    with orcd.GGUFFile(tiny_path) as f:
        n_vocab = f.tensor_info("token_embd.weight").shape[1]
        file_type = f.get("general.file_type")
    assert file_type == 7  # llama.cpp's MOSTLY_Q8_0, written by tests/tiny_models.py
    assert h["status"] == "ok" and h["resident"] is True and h["device"] == "cpu"
    assert h["model"] == server.model_id
    assert h["quant_kind"] == "Q8_0"
    assert h["tokenizer_kind"] == "gpt2/qwen2"
    assert h["vocab_size"] == n_vocab
    assert h["context_length"] == 512
    assert h["kv_pool_positions"] == 32 * 512  # every sequence's n_ctx (a multiple of the 64-position unit)
    assert 0 <= h["kv_pool_reserved"] <= h["kv_pool_positions"]
    assert h["sm"] is None and h["cuda_runtime_version"] is None and h["vram_bytes_used"] is None
    assert 0 < h["uptime_seconds"] < 3600
    for k in ("status", "model", "resident", "quant_kind", "vram_bytes_used", "tokenizer_kind", "vocab_size",
              "context_length", "uptime_seconds", "sm", "cuda_runtime_version"):
        assert k in h
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [server.model_id]
    r = httpx.get(server.url + "/v1/models/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    before = server.metrics()
    out = server.client().completions.create(model=server.model_id, prompt="Hello", max_tokens=5, temperature=0,
                                             extra_body={"ignore_eos": True})
    m = server.metrics()
    assert out.usage.completion_tokens == 5
    assert m['orcd_requests_total{outcome="length"}'] == before['orcd_requests_total{outcome="length"}'] + 1
    assert m["orcd_generation_tokens_total"] == before["orcd_generation_tokens_total"] + 5
    assert m["orcd_prompt_tokens_total"] == before["orcd_prompt_tokens_total"] + out.usage.prompt_tokens
    assert m["orcd_time_to_first_token_seconds_count"] == before["orcd_time_to_first_token_seconds_count"] + 1
    assert m["orcd_time_per_output_token_seconds_count"] == before["orcd_time_per_output_token_seconds_count"] + 1
    assert m["orcd_kv_slots_total"] == 32 and m["orcd_vram_bytes_used"] == 0
    for k in ("orcd_requests_running", "orcd_requests_waiting", "orcd_kv_slots_in_use", "orcd_uptime_seconds"):
        assert k in m


def test_loading_state_answers_503(tiny_path, logs):
    with Server(tiny_path, "--n-ctx", "256", "--load-delay", "3", log_dir=logs, wait=False) as s:
        t0 = time.monotonic()
        while True:
            assert time.monotonic() - t0 < 30, s.log()
            try:
                r = httpx.get(s.url + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.json()["resident"] is False
        with pytest.raises(openai.InternalServerError) as e:
            s.client().completions.create(model="x", prompt="Hi", max_tokens=2)
        assert e.value.status_code == 503 and "loading" in e.value.message
        st, body = execute(s.url, {"job_id": "j", "prompt": "Hi"})
        assert st == 503 and body["error"]["code"] == "UNAVAILABLE"
        assert s.wait_ready()["status"] == "ok"
        assert s.stop() == 0


def test_bad_arguments_and_missing_model_exit_1(tiny_path, logs):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "orcd.cli", "serve", "--device", "cpu",
                               "--port", str(free_port()), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60, cwd=logs)

    p = serve("-m", tiny_path, "--max-seqs", "0")
    assert p.returncode == 1 and "--max-seqs must be an integer >= 1" in p.stderr
    p = serve("-m", tiny_path, "--grace", "-1")
    assert p.returncode == 1 and "--grace" in p.stderr
    p = serve("-m", os.path.join(logs, "no-such-model.gguf"))
    assert p.returncode == 1 and "could not load the model" in p.stderr and "no-such-model" in p.stderr


# ------------------------------------------------------------------ OpenAI API
def test_completions_greedy_equal_the_model(server, ref):
    c = server.client()
    for prompt in ("Hello world", "def add(a, b):", "The quick brown fox"):
        want = ref.generate(prompt, max_tokens=30, **GREEDY)
        out = c.completions.create(model=server.model_id, prompt=prompt, max_tokens=30, temperature=0)
        assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == server.model_id
        ch = out.choices[0]
        assert ch.text == want.text and ch.finish_reason == want.finish_reason and ch.index == 0
        assert out.usage.prompt_tokens == len(ref.tokenize(prompt, special=True))
        assert out.usage.completion_tokens == len(want.token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        # streamed: the same text in pieces, then the finish_reason, then the usage chunk
        chunks = list(c.completions.create(model=server.model_id, prompt=prompt, max_tokens=30, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want.text
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [want.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
        assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_token_id_prompt_and_model_field_optional(server, ref):
    ids = ref.tokenize("Once upon a time")
    want = ref.generate(ids, max_tokens=12, **GREEDY)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 12, "temperature": 0},
                   timeout=30)  # no "model": the served one
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text
    # a max_tokens beyond the context: generation ends where the context does
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 10**12, "temperature": 0,
                                                          "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 512 - len(ids)


def test_chat_equal_the_model(server, ref):
    c = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    want = ref.chat(messages, max_tokens=25, **GREEDY)
    out = c.chat.completions.create(model=server.model_id, messages=messages, max_tokens=25, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(ref.chat_ids(messages))
    assert out.usage.completion_tokens == len(want.token_ids)
    chunks = list(c.chat.completions.create(model=server.model_id, messages=messages, max_completion_tokens=25,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)


def test_n2_is_two_seeded_requests(server, ref):
    c = server.client()
    kw = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    want = [ref.generate("Hello", max_tokens=20, seed=s, **kw).text for s in (7, 8)]
    out = c.completions.create(model=server.model_id, prompt="Hello", max_tokens=20, n=2, seed=7, temperature=1.0)
    assert [ch.index for ch in out.choices] == [0, 1]
    assert [ch.text for ch in out.choices] == want
    assert want[0] != want[1]
    # streamed n=2: chunks of both choices interleave, each joins to its text
    got = {0: "", 1: ""}
    fins = {}
    for ch in c.completions.create(model=server.model_id, prompt="Hello", max_tokens=20, n=2, seed=7,
                                   temperature=1.0, stream=True):
        for x in ch.choices:
            got[x.index] += x.text
            if x.finish_reason:
                fins[x.index] = x.finish_reason
    assert [got[0], got[1]] == want and set(fins) == {0, 1}
    chat = c.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=10, n=2, seed=3, temperature=1.0)
    ref_chat = [ref.chat([{"role": "user", "content": "Hi"}], max_tokens=10, seed=s, **kw).text for s in (3, 4)]
    assert [ch.message.content for ch in chat.choices] == ref_chat
    assert chat.usage.completion_tokens == sum(
        len(ref.chat([{"role": "user", "content": "Hi"}], max_tokens=10, seed=s, **kw).token_ids) for s in (3, 4))


def test_seed_determinism(server):
    c = server.client()

    def gen(seed):
        return c.completions.create(model=server.model_id, prompt="The", max_tokens=24, temperature=1.0,
                                    seed=seed).choices[0].text

    a, b = gen(1234), gen(1234)
    assert a == b
    assert len({gen(s) for s in (1, 2, 3)}) > 1


def test_stop_strings(server, ref):
    c = server.client()
    full = ref.generate("Hello world", max_tokens=60, ignore_eos=True, **GREEDY).text
    assert len(full) > 20, full
    k = 12
    stop = full[k:k + 3]
    want = full[:full.find(stop)]
    for stops in (stop, ["zzzz-not-there", stop]):
        out = c.completions.create(model=server.model_id, prompt="Hello world", max_tokens=60, temperature=0,
                                   stop=stops, extra_body={"ignore_eos": True})
        assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == len(
            ref.generate("Hello world", max_tokens=60, ignore_eos=True, stop=stops, **GREEDY).token_ids)
        chunks = list(c.completions.create(model=server.model_id, prompt="Hello world", max_tokens=60,
                                           temperature=0, stop=stops, stream=True,
                                           extra_body={"ignore_eos": True}))
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    # the worker API cuts at the stop string too
    st, events = execute(server.url, {"job_id": "stop-1", "prompt": "Hello world", "raw": True, "max_tokens": 60,
                                      "temperature": 0, "stop": [stop], "ignore_eos": True})
    text, last = check_execute_events(events)
    assert text == want and last[0] == "end" and last[1]["finish_reason"] == "stop"
    server.wait_idle()


def test_openai_errors(server):
    c = server.client()
    m = server.model_id
    rejected0 = server.metrics()['orcd_requests_total{outcome="rejected"}']
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    bad = [(dict(temperature=3.0), "temperature"), (dict(temperature="hot"), "temperature"),
           (dict(top_p=0), "top_p"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
           (dict(stop=[""]), "stop"), (dict(presence_penalty=5), "presence_penalty"),
           (dict(seed="x"), "seed"), (dict(min_p=2), "min_p")]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            if "min_p" in kw:
                c.completions.create(model=m, prompt="Hi", extra_body=kw)
            else:
                c.completions.create(model=m, prompt="Hi", **kw)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (kw, e.value.body)
        assert param in e.value.body["message"]
        assert e.value.body["type"] == "invalid_request_error"
    for kw, param in ((dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(top_logprobs=2), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], **kw)
        assert e.value.body["param"] == param and param in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=m, prompt="Hi", logprobs=21)
    assert e.value.body["param"] == "logprobs" and "logprobs" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=[])
    assert e.value.body["param"] == "messages"
    # a prompt beyond the context (n_ctx 512): as text and as token ids
    for prompt in ("hello " * 600, [5] * 600):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=m, prompt=prompt, max_tokens=2)
        assert e.value.body["code"] == "context_length_exceeded", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=[{"role": "user", "content": "hello " * 600}])
    assert e.value.body["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/nothing-here", json={}, timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    m = server.wait_idle()
    # every refusal above but the unknown route is counted (model, bad values, logprobs x 3, messages,
    # 3 context overflows, bad JSON)
    assert m['orcd_requests_total{outcome="rejected"}'] - rejected0 == 1 + len(bad) + 3 + 1 + 3 + 1


def test_logprobs_over_http(server, ref, tiny_path):
    """logprobs / top_logprobs / echo through the official client, streamed and not, against
    NumPy's log_softmax of the CPU engine's logits for the same tokens (tests/test_logprobs.py).
    Tolerance 1e-3: another request may share the server's batch (rounding of a batched row)."""
    from test_logprobs import forward_rows, log_softmax, ref_top

    c = server.client()
    m = server.model_id
    tok = ref.tokenizer
    piece = (lambda t: tok.token_to_bytes(t).decode("utf-8", errors="replace"))
    eng = orcd._orcd.CpuEngine(tiny_path, 512, 1)
    try:
        msgs = [{"role": "user", "content": "Say something"}]
        want = ref.chat(msgs, max_tokens=8, ignore_eos=True, **GREEDY)
        ids = ref.chat_ids(msgs)
        rows = log_softmax(forward_rows(eng, ids, want.token_ids))
        out = c.chat.completions.create(model=m, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=3, extra_body={"ignore_eos": True})
        content = out.choices[0].logprobs.content
        assert len(content) == len(want.token_ids) == 8
        for k, (e, t) in enumerate(zip(content, want.token_ids)):
            row = rows[len(ids) - 1 + k]
            assert e.bytes == list(tok.token_to_bytes(t)) and e.token == piece(t)
            assert abs(e.logprob - row[t]) <= 1e-3
            assert [x.token for x in e.top_logprobs] == [piece(i) for i, _ in ref_top(row, 3)]
            assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top-1
            assert sum(np.exp(x.logprob) for x in e.top_logprobs) <= 1 + 1e-5
        chunks = list(c.chat.completions.create(model=m, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                                top_logprobs=3, stream=True, extra_body={"ignore_eos": True}))
        streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for x in ch.choices[0].logprobs.content]
        assert [x.token for x in streamed] == [x.token for x in content]
        # (the cached prompt prefix is reused this time: its last token alone rounds differently)
        assert all(abs(a.logprob - b.logprob) <= 1e-3 for a, b in zip(streamed, content))
        plain = c.chat.completions.create(model=m, messages=msgs, max_tokens=2, temperature=0)
        assert plain.choices[0].logprobs is None

        prompt = "Hello world"
        pids = ref.tokenize(prompt, special=True)
        want = ref.generate(prompt, max_tokens=5, ignore_eos=True, **GREEDY)
        rows = log_softmax(forward_rows(eng, pids, want.token_ids))
        out = c.completions.create(model=m, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True,
                                   extra_body={"ignore_eos": True})
        ch = out.choices[0]
        assert ch.text == prompt + want.text
        lp = ch.logprobs
        n = len(pids)
        assert len(lp.tokens) == n + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for j in range(1, n):  # prompt token j given the tokens before it
            assert abs(lp.token_logprobs[j] - rows[j - 1][pids[j]]) <= 1e-3
        for k, t in enumerate(want.token_ids):
            assert abs(lp.token_logprobs[n + k] - rows[n - 1 + k][t]) <= 1e-3
            assert set(lp.top_logprobs[n + k]) == {piece(i) for i, _ in ref_top(rows[n - 1 + k], 2)}
        for t_text, off in zip(lp.tokens, lp.text_offset):
            assert ch.text[off:off + len(t_text)] == t_text
        chunks = list(c.completions.create(model=m, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                                           echo=True, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(x.choices[0].text for x in chunks) == ch.text
        got = [v for x in chunks if x.choices[0].logprobs for v in x.choices[0].logprobs.tokens]
        offs = [v for x in chunks if x.choices[0].logprobs for v in x.choices[0].logprobs.text_offset]
        assert got == lp.tokens and offs == lp.text_offset
        echo_only = c.completions.create(model=m, prompt=prompt, max_tokens=3, temperature=0, echo=True)
        assert echo_only.choices[0].text.startswith(prompt) and echo_only.choices[0].logprobs is None
    finally:
        eng.close()
    server.wait_idle()


def test_api_key_and_full_queue(slow_path, logs):
    with Server(slow_path, "--n-ctx", "4096", "--max-seqs", "1", "--max-queue", "0", "--api-key", "sekret",
                log_dir=logs) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").completions.create(model=s.model_id, prompt="Hi", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi"}, timeout=10)
        assert r.status_code == 401 and "missing" in r.json()["error"]["message"]
        st, body = execute(s.url, {"job_id": "a", "prompt": "Hi"})
        assert st == 401 and body["error"]["code"] == "UNAUTHORIZED"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # open
        c = s.client(api_key="sekret")
        assert c.completions.create(model=s.model_id, prompt="Hi", max_tokens=3).usage.completion_tokens >= 1

        # one slot, no waiting room: a long job holds it, the next request gets 429
        auth = {"Authorization": "Bearer sekret"}
        holder = httpx.stream("POST", s.url + "/execute", headers=auth, timeout=60,
                              json={"job_id": "long", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True})
        resp = holder.__enter__()
        try:
            lines = resp.iter_lines()
            assert [e for e, _ in _take(sse(lines), 2)] == ["started", "token"]
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model=s.model_id, prompt="Hi", max_tokens=2)
            assert e.value.status_code == 429 and e.value.response.headers["Retry-After"] == "1"
            st, body = execute(s.url, {"job_id": "b", "prompt": "Hi"}, headers=auth)
            assert st == 429 and body["error"]["code"] == "BUSY"
            st, body = execute(s.url, {"job_id": "long", "prompt": "Hi"}, headers=auth)
            assert st == 409 and body["error"]["code"] == "DUPLICATE_JOB"
            r = httpx.post(s.url + "/cancel", json={"job_id": "long"}, headers=auth, timeout=10)
            assert r.status_code == 202
            rest = [e for e, _ in sse(lines)]
            assert rest[-1] == "error" and "end" not in rest
        finally:
            holder.__exit__(None, None, None)
        s.wait_idle()
        assert c.completions.create(model=s.model_id, prompt="Hi", max_tokens=2).choices[0].finish_reason
        assert s.stop() == 0


def _take(it, n):
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


# ------------------------------------------------------------------ worker API
def test_execute_events_and_text(server, ref):
    # raw: the prompt as it is; the joined pieces equal the model's text and the OpenAI route's
    st, events = execute(server.url, {"job_id": "e1", "prompt": "Hello world", "raw": True, "max_tokens": 80,
                                      "temperature": 0, "top_k": 0, "top_p": 1, "min_p": 0, "ignore_eos": True})
    assert st == 200
    text, (name, end) = check_execute_events(events)
    want = ref.generate("Hello world", max_tokens=80, ignore_eos=True, **GREEDY)
    assert name == "end" and text == want.text
    assert any(ord(ch) > 127 for ch in want.text)  # multi-byte text (and U+FFFD) crossed token boundaries
    assert end["tokens_out"] == 80 and end["finish_reason"] == "length" and end["decode_time_ms"] >= 0
    started = events[0][1]
    assert started["job_id"] == "e1" and started["model"] == server.model_id
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", started["started_at"])
    out = server.client().completions.create(model=server.model_id, prompt="Hello world", max_tokens=80,
                                             temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == text
    # not raw: the prompt is the user message of the model's chat template
    st, events = execute(server.url, {"job_id": "e2", "prompt": "What is 2+2?", "max_tokens": 20,
                                      "temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 11})
    text, (name, end) = check_execute_events(events)
    want = ref.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=20, temperature=0.7, top_k=40,
                    top_p=0.95, min_p=0.05, seed=11)
    assert text == want.text and end["tokens_out"] == len(want.token_ids)


def test_execute_validation(server):
    cases = [({"prompt": "Hi"}, "job_id"), ({"job_id": "v", "prompt": ""}, "prompt"),
             ({"job_id": "v", "prompt": "Hi", "temperature": "x"}, "temperature"),
             ({"job_id": "v", "prompt": "Hi", "max_tokens": -1}, "max_tokens"),
             ({"job_id": "v", "prompt": "Hi", "top_p": 1.5}, "top_p"),
             ({"job_id": "v", "prompt": "Hi", "stop": 5}, "stop"),
             ({"job_id": "v", "prompt": "Hi", "raw": "yes"}, "raw"),
             ({"job_id": "v", "prompt": "Hi", "cache_prompt": "no"}, "cache_prompt")]
    for body, param in cases:
        st, out = execute(server.url, body)
        assert st == 400 and out["error"]["code"] == "INVALID_REQUEST" and out["error"]["param"] == param, (body, out)
    st, out = execute(server.url, {"job_id": "v", "prompt": "hello " * 600, "raw": True})
    assert st == 400 and out["error"]["code"] == "CONTEXT_OVERFLOW"
    r = httpx.post(server.url + "/execute", content=b"[1, 2", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    r = httpx.post(server.url + "/cancel", json={"job_id": "never-ran"}, timeout=10)
    assert r.status_code == 202 and r.json()["status"] == "unknown"
    r = httpx.post(server.url + "/cancel", json={}, timeout=10)
    assert r.status_code == 400


def test_cancel_latency(slow_server):
    url = slow_server.url
    events = []

    def reader():
        with httpx.stream("POST", url + "/execute", timeout=60,
                          json={"job_id": "c1", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}) as r:
            for e, d in sse(r.iter_lines()):
                events.append((time.perf_counter(), e, json.loads(d)))

    ctl = httpx.Client(base_url=url, timeout=10)  # connected before the measurement
    assert ctl.get("/health").status_code == 200
    t = threading.Thread(target=reader)
    t.start()
    t_wait = time.monotonic()
    while sum(e == "token" for _, e, _ in list(events)) < 5:
        assert time.monotonic() - t_wait < 30 and t.is_alive()
        time.sleep(0.005)
    t0 = time.perf_counter()
    r = ctl.post("/cancel", json={"job_id": "c1"})
    t_answer = time.perf_counter()
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    t.join(10)
    assert not t.is_alive()
    names = [e for _, e, _ in events]
    assert names[-1] == "error" and events[-1][2]["code"] == "CANCELLED" and "end" not in names
    latency = events[-1][0] - t0
    print(f"\ncancel latency: {latency * 1000:.1f} ms after the /cancel call "
          f"(its 202 took {(t_answer - t0) * 1000:.1f} ms); {names.count('token')} pieces before")
    assert latency < 0.1, f"the CANCELLED event came {latency * 1000:.1f} ms after /cancel"
    r = ctl.post("/cancel", json={"job_id": "c1"})  # idempotent
    assert r.status_code == 202
    ctl.close()
    slow_server.wait_idle(2.0)  # the engine freed the slot


def test_disconnect_cancels(slow_server):
    url = slow_server.url
    before = slow_server.metrics()['orcd_requests_total{outcome="cancelled"}']
    # the worker API: read a few events, then hang up
    with httpx.stream("POST", url + "/execute", timeout=60,
                      json={"job_id": "d1", "prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}) as r:
        got = _take(sse(r.iter_lines()), 4)
        assert [e for e, _ in got] == ["started", "token", "token", "token"]
    slow_server.wait_idle(3.0)
    # the OpenAI API: a stream closed by the client
    c = slow_server.client()
    stream = c.completions.create(model=slow_server.model_id, prompt="Hi", max_tokens=4000, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    m = slow_server.wait_idle(3.0)
    assert m['orcd_requests_total{outcome="cancelled"}'] == before + 2
    assert m["orcd_generation_tokens_total"] < 4000  # neither ran to its end


def test_sigterm_with_requests_in_flight(slow_path, logs):
    s = Server(slow_path, "--n-ctx", "4096", "--max-seqs", "4", "--grace", "3", log_dir=logs)
    try:
        results = {}
        first_token = {}

        def worker(jid, max_tokens):
            first_token[jid] = threading.Event()
            events = []
            try:
                with httpx.stream("POST", s.url + "/execute", timeout=60,
                                  json={"job_id": jid, "prompt": "Hi", "max_tokens": max_tokens,
                                        "ignore_eos": True}) as r:
                    assert r.status_code == 200, r.read()
                    for e, d in sse(r.iter_lines()):
                        events.append((e, json.loads(d)))
                        if e == "token":
                            first_token[jid].set()
                results[jid] = events
            except Exception as e:  # noqa: BLE001
                results[jid] = e

        def openai_stream():
            first_token["openai"] = threading.Event()
            try:
                for _ in s.client().completions.create(model=s.model_id, prompt="Hi", max_tokens=4000,
                                                       stream=True, extra_body={"ignore_eos": True}):
                    first_token["openai"].set()
                results["openai"] = ("ended", "")
            except openai.APIError as e:
                results["openai"] = ("error", str(e))

        threads = [threading.Thread(target=worker, args=(f"long{i}", 4000)) for i in range(2)]
        threads += [threading.Thread(target=openai_stream), threading.Thread(target=worker, args=("short", 30))]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while len(first_token) < 4 or not all(ev.is_set() for ev in first_token.values()):
            assert time.monotonic() - t0 < 30 and all(t.is_alive() for t in threads[:3]), (results, s.log())
            time.sleep(0.005)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi"}, timeout=10)  # draining: refused
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert s.proc.wait(STOP_TIMEOUT) == 0, s.log()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        for jid in ("long0", "long1"):
            _, (name, data) = check_execute_events(results[jid])  # exactly one terminal event
            assert name == "error" and data["code"] == "CANCELLED" and "shutting down" in data["message"]
        _, (name, data) = check_execute_events(results["short"])
        assert name == "end" and data["tokens_out"] == 30  # finished within the grace period
        assert results["openai"][0] == "error" and "shutting down" in results["openai"][1]
        assert "stopped" in s.log()
    finally:
        s.stop()


def test_sigterm_delivers_whole_streams_to_slow_readers(tiny_path, logs):
    """A client that has not read a byte of its stream (a small receive window) when the server
    stops still gets all of it once it reads, the terminal event last: the stop cuts no stream
    that the client is slow to drain. (The few hundred KB here fit the kernel's socket buffers;
    beyond them, ~2.8 MB on loopback, serve() also waits for the rest to be sent.)"""
    import http.client

    class SmallWindow(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.sock.settimeout(60)
            self.sock.connect((self.host, self.port))

    s = Server(tiny_path, "--n-ctx", "4096", "--max-seqs", "2", "--grace", "0", log_dir=logs)
    try:
        conn = SmallWindow("127.0.0.1", s.port)
        conn.request("POST", "/execute", body=json.dumps({"job_id": "unread", "prompt": "Hi", "max_tokens": 4000,
                                                           "ignore_eos": True}),
                     headers={"Content-Type": "application/json"})
        t0 = time.monotonic()  # a few hundred KB written (~100 bytes a token), none of it read
        while True:
            m = s.metrics()
            tokens = m["orcd_generation_tokens_total"]
            if tokens >= 2500 or (tokens > 0 and m["orcd_requests_running"] == 0):
                break
            assert time.monotonic() - t0 < 60, s.log()
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(STOP_TIMEOUT) == 0, s.log()
        r = conn.getresponse()  # read only now, from a server that has exited
        assert r.status == 200
        body = r.read().decode("utf-8")  # http.client raises IncompleteRead on a cut chunked body
        events = [(e, json.loads(d)) for e, d in sse(body.split("\n"))]
        text, (name, data) = check_execute_events(events)
        # ended by the stop, or (a fast machine) done before it: either way whole, its end last
        assert (name == "error" and data["code"] == "CANCELLED") or (name == "end" and data["tokens_out"] == 4000), data
        assert len(text) > 0
        conn.close()
    finally:
        s.stop()


# ------------------------------------------------------------------ many at once
PROMPTS32 = [f"Prompt number {i}: " + " ".join(["the", "dog", "fox", "is"][j % 4] for j in range(i % 7 + 1))
             for i in range(32)]


def _stream_all(server, prompts, **kw) -> list:
    """Every prompt streamed at once through /v1/completions (the official async client): the texts."""
    async def run_all():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)

        async def one(p):
            text = ""
            async for ch in await c.completions.create(model=server.model_id, prompt=p, stream=True, **kw):
                text += ch.choices[0].text
            return text

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await c.close()

    return asyncio.run(run_all())


def test_32_concurrent_greedy_streams_equal_single(server, ref):
    want = [ref.generate(p, max_tokens=24, **GREEDY).text for p in PROMPTS32]
    single = server.client().completions.create(model=server.model_id, prompt=PROMPTS32[5], max_tokens=24,
                                                temperature=0)
    assert single.choices[0].text == want[5]

    got = _stream_all(server, PROMPTS32, max_tokens=24, temperature=0)
    for i in range(32):
        assert got[i] == want[i], i
    server.wait_idle()


def test_kv_memory_budget_waits_and_stays_correct(tiny_path, ref, logs):
    """--kv-memory for two sequences, four slots: requests that do not fit wait for memory
    (orcd_kv_admission_waits), and every stream gives the text it gives alone; cache_prompt
    false gives the same text as the cached prefix."""
    with orcd.GGUFFile(tiny_path) as f:
        n_layer = f.get("qwen2.block_count")
        kv_dim = f.get("qwen2.embedding_length") // f.get("qwen2.attention.head_count") * \
            f.get("qwen2.attention.head_count_kv")
    budget = 2 * 512 * n_layer * kv_dim * 2 * 4  # two sequences of n_ctx, float32 K and V
    prompts = PROMPTS32[:6]
    want = [ref.generate(p, max_tokens=300, ignore_eos=True, **GREEDY).text for p in prompts]
    with Server(tiny_path, "--n-ctx", "512", "--max-seqs", "4", "--kv-memory", str(budget), log_dir=logs) as s:
        assert httpx.get(s.url + "/health", timeout=10).json()["kv_pool_positions"] == 2 * 512

        got = _stream_all(s, prompts, max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
        assert got == want
        assert s.metrics()["orcd_kv_admission_waits"] > 0
        again = s.client().completions.create(model=s.model_id, prompt=prompts[0], max_tokens=300, temperature=0,
                                              extra_body={"ignore_eos": True, "cache_prompt": False})
        assert again.choices[0].text == want[0]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_200_mixed_requests_leak_nothing(server):
    import random

    rng = random.Random(5)

    async def run(n, tag):
        import aiohttp

        sem = asyncio.Semaphore(16)
        outcomes = []

        async def one(k, session):
            kind = rng.choice(["completion", "chat", "stream", "execute", "execute_cancel", "disconnect", "n2",
                               "bad"])
            async with sem:
                body = {"max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8]), "seed": k}
                if rng.random() < 0.3:
                    body["stop"] = ["e", "the"]
                if kind in ("completion", "stream", "n2", "disconnect", "bad"):
                    body["prompt"] = f"Request {k} says hello"
                    if kind == "stream" or kind == "disconnect":
                        body["stream"] = True
                    if kind == "n2":
                        body["n"] = 2
                    if kind == "bad":
                        body["temperature"] = -1
                    async with session.post(server.url + "/v1/completions", json=body) as r:
                        if kind == "bad":
                            assert r.status == 400
                        elif kind == "disconnect":
                            await r.content.readline()
                            r.close()
                        else:
                            assert r.status == 200, await r.text()
                            raw = await r.read()
                            if kind == "stream":
                                assert raw.endswith(b"data: [DONE]\n\n")
                elif kind == "chat":
                    body["messages"] = [{"role": "user", "content": f"Hi {k}"}]
                    async with session.post(server.url + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        await r.read()
                else:
                    jid = f"{tag}-{k}"
                    body.update(job_id=jid, prompt=f"Job {k}")
                    async with session.post(server.url + "/execute", json=body) as r:
                        assert r.status == 200
                        if kind == "execute_cancel":
                            await r.content.readline()
                            async with session.post(server.url + "/cancel", json={"job_id": jid}) as c:
                                assert c.status == 202
                        raw = (await r.read()).decode()
                        assert raw.count("event: end") + raw.count("event: error") == 1, raw[-300:]
                outcomes.append(kind)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(one(k, session) for k in range(n)))
        return outcomes

    pid = server.proc.pid
    asyncio.run(run(40, "warm"))
    server.wait_idle()
    rss0 = _rss_kb(pid)
    kinds = asyncio.run(run(200, "mix"))
    assert len(kinds) == 200
    m = server.wait_idle()
    assert m["orcd_kv_slots_in_use"] == 0
    rss1 = _rss_kb(pid)
    print(f"\nserver RSS {rss0} -> {rss1} kB over 200 mixed requests")
    assert rss1 - rss0 < 32 * 1024, f"RSS grew {rss0} -> {rss1} kB over 200 requests"
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok"


# ------------------------------------------------------------------ the haiku over HTTP (real model)
class _HttpChat:
    """What tests/test_generate.haiku_acceptance needs of a model (chat() with .text and
    .token_ids, device), answered by POST /execute on a server of the real model: the
    prompt is sent as it is and the server applies the chat template."""

    device = os.environ.get("ORCD_TEST_SERVER_DEVICE", "cpu") + " (HTTP /execute)"

    def __init__(self, url):
        self.url = url
        self.n = 0

    def chat(self, messages, temperature, top_k, top_p, min_p, seed, max_tokens):
        self.n += 1
        st, events = execute(self.url, {"job_id": f"haiku-{self.n}", "prompt": messages[-1]["content"],
                                        "temperature": temperature, "top_k": top_k, "top_p": top_p,
                                        "min_p": min_p, "seed": seed, "max_tokens": max_tokens,
                                        # the whole prompt evaluated each time: on the GPU a reused
                                        # prefix changes the rounding of what follows
                                        "cache_prompt": False}, timeout=300)
        assert st == 200, events
        text, (name, end) = check_execute_events(events)
        assert name == "end", end
        return SimpleNamespace(text=text, token_ids=text)  # same seed -> the same text


def test_haiku_over_http(real_model_path, logs):
    from test_generate import haiku_acceptance  # the minute word, its check and the 5 tries

    with Server(real_model_path, "--n-ctx", "512", "--max-seqs", "2", log_dir=logs, threads=2) as s:
        passed, transcripts = haiku_acceptance(_HttpChat(s.url))
        print("\n" + "\n".join(transcripts))
        assert passed, "\n".join(transcripts)
        assert s.stop() == 0
