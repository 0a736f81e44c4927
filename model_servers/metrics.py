"""Prometheus metrics of a model server, in a dedicated registry (names in docs/model-server.md)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("ok", "client_error", "server_error")
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_LABELS = ("model", "version")


class ModelMetrics:
    """The label children of one model version: recording is a dict lookup and an add."""

    def __init__(self, server: ServerMetrics, model: str, version: str) -> None:
        self._server = server
        self._labels = (model, version)
        self._requests = {o: server.requests.labels(model, version, o) for o in OUTCOMES}
        self._seconds = server.seconds.labels(model, version)
        self.inflight = server.inflight.labels(model, version)
        self._batch_rows = server.batch_rows.labels(model, version)
        self._batch_requests = server.batch_requests.labels(model, version)

    def observe(self, status: int, seconds: float) -> None:
        """Record one finished inference request by its HTTP status."""
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
        self._requests[outcome].inc()
        self._seconds.observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        """Record one predict call over `rows` rows merged from `requests` requests."""
        self._batch_rows.observe(rows)
        self._batch_requests.observe(requests)

    def track_queue(self, depth: Callable[[], float]) -> None:
        """Report `depth()` as this version's queue depth."""
        self._server.queue_depth.labels(*self._labels).set_function(depth)

    def unregister(self) -> None:
        """Drop the gauges of an unloaded version (counters and histograms stay)."""
        for gauge in (self._server.inflight, self._server.queue_depth):
            try:
                gauge.remove(*self._labels)
            except KeyError:
                pass


class ServerMetrics:
    """Every metric of one server process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "infergate_model_requests",
            "Inference requests by outcome.",
            [*_LABELS, "outcome"],
            registry=r,
        )
        self.seconds = Histogram(
            "infergate_model_request_seconds",
            "Inference request latency in seconds.",
            _LABELS,
            buckets=_SECONDS,
            registry=r,
        )
        self.inflight = Gauge(
            "infergate_model_inflight_requests",
            "Inference requests being processed.",
            _LABELS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "infergate_model_queue_depth", "Requests waiting for the batcher.", _LABELS, registry=r
        )
        self.batch_rows = Histogram(
            "infergate_model_batch_size",
            "Rows per predict call.",
            _LABELS,
            buckets=_SIZES,
            registry=r,
        )
        self.batch_requests = Histogram(
            "infergate_model_batch_requests",
            "Requests merged into one predict call.",
            _LABELS,
            buckets=_SIZES,
            registry=r,
        )
        self.unknown_model = Counter(
            "infergate_unknown_model_requests",
            "Requests naming a model or version not loaded.",
            registry=r,
        )

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)
