"""Prometheus series of one server (`GET /metrics`), in their own registry so several servers can share a process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: CPU decode steps take milliseconds to a second, GPU ones far less.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, kv_pages_total: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "mixq_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("mixq_prompt_tokens", "prompt tokens admitted to the engine", registry=r)
        self.generation_tokens = Counter("mixq_generation_tokens", "tokens generated", registry=r)
        self.aborted = Counter("mixq_requests_aborted", "requests aborted (client gone or stopped)", registry=r)
        self.running = Gauge("mixq_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("mixq_requests_waiting", "requests waiting for a batch slot or KV pages", registry=r)
        self.pages_used = Gauge("mixq_kv_pages_used", "KV cache pages in use", registry=r)
        total = Gauge("mixq_kv_pages_total", "KV cache pages in the pool", registry=r)
        total.set(kv_pages_total)
        self.ttft = Histogram(
            "mixq_time_to_first_token_seconds",
            "from submission to the first sampled token",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "mixq_inter_token_latency_seconds", "between consecutive tokens of a request", buckets=_LATENCY, registry=r
        )
