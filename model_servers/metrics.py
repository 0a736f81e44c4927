"""Prometheus metrics for one served model version, in a dedicated registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("ok", "client_error", "server_error")
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ModelMetrics:
    """Request counters, latency histogram and in-flight gauge for one model version."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, version: str) -> None:
        self.registry = CollectorRegistry()
        requests = Counter(
            "infergate_model_requests",
            "Inference requests by outcome.",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        seconds = Histogram(
            "infergate_model_request_seconds",
            "Inference request latency in seconds.",
            ["model", "version"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "infergate_model_inflight_requests",
            "Inference requests being processed.",
            registry=self.registry,
        )
        # label children resolved once: the request path only increments
        self._requests = {o: requests.labels(model, version, o) for o in OUTCOMES}
        self._seconds = seconds.labels(model, version)

    def observe(self, status: int, seconds: float) -> None:
        """Record one finished inference request by its HTTP status."""
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
        self._requests[outcome].inc()
        self._seconds.observe(seconds)

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)
