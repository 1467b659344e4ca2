"""Prometheus metrics of one app instance (its own CollectorRegistry, so several apps can live in
one process, as they do in the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Routes get their own label value; anything else is "other" (no unbounded label sets).
ROUTES = (
    "/v1/model",
    "/v1/tokenize",
    "/v1/score",
    "/v1/inputs",
    "/v1/score/handle",
    "/healthz",
    "/readyz",
    "/metrics",
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fedbpt_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedbpt_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.rows_scored = Counter("fedbpt_rows_scored", "Rows (P x B) scored", registry=self.registry)
        self.score_requests = Counter(
            "fedbpt_score_calls", "Successful /v1/score calls", registry=self.registry
        )
        self.forward_rows = Histogram(
            "fedbpt_forward_batch_rows",
            "Rows per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=self.registry,
        )
        self.forward_tokens = Counter(
            "fedbpt_forward_padded_tokens", "Padded tokens through the model", registry=self.registry
        )
        self.queue_depth = Gauge(
            "fedbpt_queue_depth", "Score jobs waiting or running in the model worker", registry=self.registry
        )
        self.in_flight = Gauge(
            "fedbpt_jobs_running", "Score jobs running now (0 or 1)", registry=self.registry
        )

        self.request_bytes = Counter(
            "fedbpt_request_bytes", "Request body bytes by route", ["route"], registry=self.registry
        )
        self.response_bytes = Counter(
            "fedbpt_response_bytes", "Response body bytes by route", ["route"], registry=self.registry
        )
        self.input_cache_bytes = Gauge(
            "fedbpt_input_cache_bytes", "Bytes of registered inputs held", registry=self.registry
        )
        self.input_cache_entries = Gauge(
            "fedbpt_input_cache_entries", "Registered input sets held", registry=self.registry
        )
        self.input_cache_evictions = Counter(
            "fedbpt_input_cache_evictions",
            "Registered input sets dropped, by reason",
            ["reason"],
            registry=self.registry,
        )

    def observe_forward(self, rows: int, padded_tokens: int) -> None:
        self.forward_rows.observe(rows)
        self.forward_tokens.inc(padded_tokens)

    def route(self, path: str) -> str:
        return path if path in ROUTES else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
