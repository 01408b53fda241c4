"""The GPU leases' summarisers, on records whose answers are known: scripts/ab_table.py (the
interleaved A/B runs of gpu.sh ab / ab_long) and scripts/gpu_attn_sweep.py's trace_summary
(the cluster attention's phases from coarse global-timer stamps and per-SM cycle stamps)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_table_means_and_changes():
    ab = _load("ab_table")
    lines = [
        "old: pp4096_tok_s 100.0 tg128@pp4096_tok_s 1000.0 ",
        "new: pp4096_tok_s 110.0 tg128@pp4096_tok_s 1100.0 ",
        "new[ORCD_CUDA_LM_BULK=1]: tg128@pp4096_tok_s 1200.0 ",
        "old: pp4096_tok_s 100.0 tg128@pp4096_tok_s 1010.0 ",
        "new: pp4096_tok_s 130.0 tg128@pp4096_tok_s 1110.0 ",
        "new[ORCD_CUDA_LM_BULK=1]: tg128@pp4096_tok_s 1220.0 ",
        "new: ",  # a run that printed nothing (timed out): no numbers, not a row
    ]
    runs = ab.parse(lines)
    assert list(runs) == ["old", "new", "new[ORCD_CUDA_LM_BULK=1]"]
    assert runs["new"]["pp4096_tok_s"] == [110.0, 130.0]
    rows = {tuple(r.split()[:2]): r.split()[2:] for r in ab.table(runs).splitlines()[1:]}
    # means 1005 / 1105 / 1210: +10.0% and +20.4% against old; spreads 10/1005, 10/1105, 20/1210
    assert rows[("tg128@pp4096_tok_s", "old")] == ["1005.0", "1.0%"]
    assert rows[("tg128@pp4096_tok_s", "new")] == ["1105.0", "0.9%", "+10.0%"]
    assert rows[("tg128@pp4096_tok_s", "new[ORCD_CUDA_LM_BULK=1]")] == ["1210.0", "1.7%", "+20.4%"]
    assert rows[("pp4096_tok_s", "new")] == ["120.0", "16.7%", "+20.0%"]


EPOCH_NS = 1_764_000_000_000_000_000  # the global timer: nanoseconds since 1970 (late 2025)


def _trace(rng, ghz, tick_ns, n_layer=24, n_head_kv=2, gx=16, fields=24):
    """Records as dec_attn_kernel writes them: every block's marks at known offsets (ns) from a
    random start, the global timer (epoch nanoseconds: 18 digits, more than a float64 holds)
    rounded down to tick_ns, the cycle counter from a per-SM origin."""
    marks = {0: 0, 1: 2000, 2: 2600, 8: 4300, 9: 4500, 3: 6000, 4: 6500, 10: 7200, 5: 7300, 6: 7400}
    rec = np.zeros((n_layer, 64 * n_head_kv, fields), dtype=np.int64)
    for layer in range(n_layer):
        for b in range(gx * n_head_kv):
            t0 = 100_000.0 * layer + rng.uniform(0, 3000)
            origin = rng.uniform(1e6, 1e9)  # each SM's counter starts elsewhere
            for m, dt in marks.items():
                rec[layer, b, m] = EPOCH_NS + int((t0 + dt) // tick_ns * tick_ns)
                rec[layer, b, 11 + m] = np.floor(origin + (t0 + dt) * ghz)
            rec[layer, b, 22] = np.floor(origin + (t0 + 5000) * ghz)  # the cluster wait returned
            rec[layer, b, 7] = b
    return dict(attn_grid_x=gx, attn_trace=rec.reshape(-1).tolist(), attn_trace_fields=fields)


def test_trace_summary_recovers_phases_from_cycles():
    sweep = _load("gpu_attn_sweep")
    r = sweep.trace_summary(_trace(np.random.default_rng(1), ghz=1.98, tick_ns=1000.0), 2)
    assert r["clock GHz"] == pytest.approx(1.98, rel=0.02)
    truth = {"wait": 2.0, "ready": 0.6, "tiles": 1.7, "wo": 0.2, "wmerge": 1.5, "cl.barrier": 0.5,
             "dsmem": 0.7, "store": 0.1, "exit": 0.1}
    for name, us in truth.items():
        assert r[name + " cyc"] == pytest.approx(us, rel=0.03), name
    assert r["cl.wait cyc"] == pytest.approx(0.5, rel=0.03) and r["merge cyc"] == pytest.approx(1.0, rel=0.03)
    # the 1 us timer alone rounds the sub-microsecond phases away (why the cycles are there)
    assert r["ready"] in (0.0, 1.0) and r["wo"] in (0.0, 1.0)


def test_trace_summary_reads_records_without_cycles():
    sweep = _load("gpu_attn_sweep")
    p = _trace(np.random.default_rng(2), ghz=1.5, tick_ns=32.0)
    old = np.array(p["attn_trace"]).reshape(24, 128, 24)[:, :, :16]  # the 16-field records before
    r = sweep.trace_summary(dict(attn_grid_x=16, attn_trace=old.reshape(-1).tolist()), 2)
    # a 32 ns timer resolves the phases to a few tens of ns (not to a float64's 256 ns steps)
    assert "clock GHz" not in r
    for name, us in {"ready": 0.6, "tiles": 1.7, "wo": 0.2, "store": 0.1, "exit": 0.1}.items():
        assert r[name] == pytest.approx(us, abs=0.04), name
