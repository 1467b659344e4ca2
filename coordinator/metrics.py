"""Prometheus metrics of one coordinator app (its own CollectorRegistry, so several apps can live
in one process, as they do in the tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from coordinator.engine import CloseResult, EngineHooks

CONTENT_TYPE = CONTENT_TYPE_LATEST


class CoordinatorMetrics(EngineHooks):
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fedbpt_coordinator_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fedbpt_coordinator_request_seconds",
            "HTTP request latency by route (long-polls included)",
            ["route"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.updates = Counter(
            "fedbpt_coordinator_updates", "Client updates acknowledged", ["duplicate"], registry=r
        )
        self.update_bytes = Counter(
            "fedbpt_coordinator_update_bytes", "Bytes of acknowledged update bodies", registry=r
        )
        self.tasks = Counter("fedbpt_coordinator_tasks", "Tasks served by kind", ["kind"], registry=r)
        self.task_bytes = Counter("fedbpt_coordinator_task_bytes", "Bytes of task bodies served", registry=r)
        self.rounds = Counter(
            "fedbpt_coordinator_rounds", "Round outcomes (closed, reissued, failed)", ["result"], registry=r
        )
        self.aggregation = Histogram(
            "fedbpt_coordinator_aggregation_seconds",
            "Server aggregation time per closed round",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.runs = Gauge("fedbpt_coordinator_runs", "Runs by state", ["state"], registry=r)
        self.clients = Gauge("fedbpt_coordinator_clients", "Enrolled clients over all runs", registry=r)

    # EngineHooks
    def update_accepted(self, duplicate: bool, bytes_in: int) -> None:
        self.updates.labels("true" if duplicate else "false").inc()
        self.update_bytes.inc(bytes_in)

    def round_closed(self, result: CloseResult, seconds: float | None) -> None:
        self.rounds.labels(result).inc()
        if seconds is not None:
            self.aggregation.observe(seconds)

    def task_served(self, kind: str, bytes_out: int) -> None:
        self.tasks.labels(kind).inc()
        self.task_bytes.inc(bytes_out)

    def set_gauges(self, runs: dict[str, int], clients: int) -> None:
        self.runs.clear()
        for state, n in runs.items():
            self.runs.labels(state).set(n)
        self.clients.set(clients)

    def render(self) -> bytes:
        return generate_latest(self.registry)
