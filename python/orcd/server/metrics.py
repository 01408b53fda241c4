"""Prometheus metrics of one server (GET /metrics), in a registry of its own so several
apps in one process (tests) never share counters.

Counters are updated by the engine when a generation ends (engine.py) and by the
handlers when they refuse a request; gauges read the engine's live state when scraped.
"""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for app.py)

# Seconds; the CPU engine and the GPU both land inside these ranges.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")


class ServerMetrics:
    """The server's metrics. outcome(): a generation ended ("stop", "length", "cancelled",
    "error") or a request was refused before it started ("rejected")."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.started = time.monotonic()
        self.requests = Counter("orcd_requests", "Generations by outcome (stop, length, cancelled, error); "
                                "requests refused before they started (rejected)", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens of submitted generations", registry=r)
        self.generated_tokens = Counter("orcd_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("orcd_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("orcd_time_per_output_token_seconds",
                              "Mean time between tokens of a generation (after the first)",
                              buckets=TPOT_BUCKETS, registry=r)
        self.running = Gauge("orcd_requests_running", "Generations holding a KV cache slot", registry=r)
        self.waiting = Gauge("orcd_requests_waiting", "Generations waiting for a KV cache slot", registry=r)
        self.kv_slots_used = Gauge("orcd_kv_slots_in_use", "KV cache slots held by running generations",
                                   registry=r)
        self.kv_pool = Gauge("orcd_kv_pool_positions", "Positions of the KV memory pool the slots share", registry=r)
        self.kv_reserved = Gauge("orcd_kv_pool_reserved_positions",
                                 "KV pool positions held by slots (running generations and cached prefixes)",
                                 registry=r)
        self.kv_waits = Gauge("orcd_kv_admission_waits",
                              "Admissions deferred because the KV pool had no room (since start)", registry=r)
        self.kv_slots_total = Gauge("orcd_kv_slots_total", "KV cache slots (--max-seqs)", registry=r)
        self.vram = Gauge("orcd_vram_bytes_used", "GPU memory in use on the device (0 on the CPU)", registry=r)
        self.uptime = Gauge("orcd_uptime_seconds", "Seconds since the server started", registry=r)
        self.uptime.set_function(lambda: time.monotonic() - self.started)

    def bind_engine(self, stats: Callable[[], dict], n_slots: int, vram: Callable[[], int]) -> None:
        """Gauges that read the engine when scraped. stats() -> {"running", "waiting"}."""
        self.running.set_function(lambda: stats()["running"])
        self.waiting.set_function(lambda: stats()["waiting"])
        self.kv_slots_used.set_function(lambda: stats()["running"])
        self.kv_slots_total.set(n_slots)
        self.kv_pool.set_function(lambda: stats().get("kv_positions", 0))
        self.kv_reserved.set_function(lambda: stats().get("kv_reserved", 0))
        self.kv_waits.set_function(lambda: stats().get("kv_waits", 0))
        self.vram.set_function(lambda: vram() or 0)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
