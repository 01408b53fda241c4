"""`orcd bench --device cpu --json` on a tiny model: runs, prints one JSON
object with the llama-bench-style keys, and its numbers are sane. CPU only,
so it runs everywhere the package is built."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "orcd.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def _check_stats(s, name):
    assert s is not None, f"{name} missing"
    assert set(s) >= {"median", "min", "max", "stdev", "n", "values"}, name
    assert s["min"] <= s["median"] <= s["max"], name
    assert s["min"] > 0 and s["stdev"] >= 0, name
    assert len(s["values"]) == s["n"], name


def test_bench_cpu_json(tiny_model):
    path = tiny_model("Q8_0")
    p = _bench("-m", path, "--device", "cpu", "-p", "16", "-n", "8", "--repeat", "2", "--threads", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["device"] == "cpu" and out["model"] == path
    assert out["n_prompt"] == 16 and out["n_gen"] == 8 and out["repeat"] == 2 and out["threads"] == 1
    assert out["load_s"] > 0
    _check_stats(out["load_warm_s"], "load_warm_s")
    for key in ("pp16_tok_s", "tg8_tok_s", "tg8@pp16_tok_s", "ttft_ms"):
        _check_stats(out[key], key)
        assert out[key]["n"] == 2, key
    assert out["tg_method"] in ("decode_greedy", "forward_loop")
    assert out["peak_rss_bytes"] > 0
    assert "vram_bytes" not in out


def test_bench_cpu_text_and_no_generation(tiny_model):
    path = tiny_model("F32")
    p = _bench("-m", path, "--device", "cpu", "-p", "8", "-n", "0", "--repeat", "1", "--threads", "1")
    assert p.returncode == 0, p.stderr
    assert "pp8_tok_s" in p.stdout and "load" in p.stdout
    assert "tg0" not in p.stdout
    p = _bench("-m", path, "--device", "cpu", "-p", "8", "-n", "0", "--repeat", "1", "--threads", "1", "--json")
    out = json.loads(p.stdout)
    assert out["tg0_tok_s"] is None and out["pp8_tok_s"]["n"] == 1


def test_bench_missing_model_is_one_line_error():
    p = _bench("-m", "/nonexistent/m.gguf", "--device", "cpu", "--json")
    assert p.returncode == 1
    assert "/nonexistent/m.gguf" in p.stderr and p.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("n_gen", [1, 3])
def test_bench_engine_counts(tiny_model, n_gen):
    """bench_engine directly: warm-up excluded, tokens per second from the timed steps."""
    from orcd import _orcd
    from orcd.bench import bench_engine

    path = tiny_model("Q4_0")
    e = _orcd.CpuEngine(path, 32, 1, 1)
    res = bench_engine(e, e.info()["n_vocab"], 5, n_gen, 3)
    assert res["pp5_tok_s"]["n"] == 3 and res[f"tg{n_gen}_tok_s"]["n"] == 3
    assert res["ttft_ms"]["median"] > 0


def test_bench_batch_cpu_json(tiny_model):
    """`orcd bench --batch` on the CPU: every batch size measured --repeat times, the reported
    figure is the median of those runs, and the token counts of each run are those asked for
    (gen_tok_s = B * (n_gen - 1) / gen time, so a run's total time bounds it from below)."""
    path = tiny_model("Q8_0")
    p = _bench("-m", path, "--device", "cpu", "--batch", "1,3", "-p", "6", "-n", "5", "--repeat", "3",
               "--threads", "1", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["device"] == "cpu" and out["repeat"] == 3
    assert [b["batch"] for b in out["batches"]] == [1, 3]
    for b in out["batches"]:
        assert b["n_prompt"] == 6 and b["n_gen"] == 5 and len(b["runs"]) == 3
        for k in ("prompt_tok_s", "gen_tok_s", "total_s"):
            vals = sorted(r[k] for r in b["runs"])
            assert all(v > 0 for v in vals), (k, vals)
            assert b[k] == vals[1], (k, b[k], vals)  # the median of three
        for r in b["runs"]:
            assert r["gen_tok_s"] >= b["batch"] * 4 / r["total_s"] * 0.999
    c = out["chat_sampled"]
    assert len(c["runs"]) == 3 and c["tokens"] == 5
    assert c["decode_tok_s"] == sorted(r["decode_tok_s"] for r in c["runs"])[1]
