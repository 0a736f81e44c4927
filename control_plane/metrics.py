"""`GET /metrics`: Prometheus text from the telemetry store and the control plane's own
state, read at scrape time by one custom collector on its own registry."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from control_plane.access_log import AccessLogServer
from control_plane.callbacks import NodeInfo
from control_plane.config import RoutingConfig
from control_plane.nodes import NodeRegistry
from control_plane.rollout import PHASES, RolloutController
from control_plane.snapshot import SHORT_NAMES
from control_plane.telemetry import DURATION_BUCKETS, TelemetryStore

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Observed(Protocol):
    store: TelemetryStore
    access_logs: AccessLogServer
    xds_metrics: XdsMetrics
    registry: NodeRegistry
    file_config: RoutingConfig | None
    reloads: Counter[str]
    last_reload_ok: float | None  # time.monotonic()
    sampler_fraction: float
    rollouts: RolloutController
    autoscaling: dict[str, dict[str, Any]]  # "model/version" -> the last decision


class XdsMetrics:
    """xDS stream callbacks (`control_plane.callbacks.Callbacks`) that count pushes,
    NACKs and the time from a push to its ACK, by type, over every stream since start."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pushes: Counter[str] = Counter()
        self.nacks: Counter[str] = Counter()
        self.acks: Counter[str] = Counter()
        self.ack_seconds: Counter[str] = Counter()
        self._sent_at: dict[str, dict[str, float]] = {}  # node -> type -> last push

    def on_connect(self, node: NodeInfo, mode: str) -> None:
        pass

    def on_disconnect(self, node: NodeInfo) -> None:
        self._sent_at.pop(node.id, None)

    def on_sent(self, node: NodeInfo, type_url: str, version: str, resources: int) -> None:
        self.pushes[SHORT_NAMES[type_url]] += 1
        self._sent_at.setdefault(node.id, {})[type_url] = self.clock()

    def on_ack(self, node: NodeInfo, type_url: str, version: str) -> None:
        sent = self._sent_at.get(node.id, {}).pop(type_url, None)
        if sent is not None:
            self.acks[SHORT_NAMES[type_url]] += 1
            self.ack_seconds[SHORT_NAMES[type_url]] += self.clock() - sent

    def on_nack(self, node: NodeInfo, type_url: str, version: str, message: str) -> None:
        self._sent_at.get(node.id, {}).pop(type_url, None)
        self.nacks[SHORT_NAMES[type_url]] += 1

    def collect(self) -> Iterator[Metric]:
        pushes = CounterMetricFamily(
            "infergate_xds_pushes", "xDS responses sent, by type", labels=["type"]
        )
        nacks = CounterMetricFamily(
            "infergate_xds_nacks", "xDS responses Envoy rejected, by type", labels=["type"]
        )
        push_seconds = SummaryMetricFamily(
            "infergate_xds_push_duration_seconds",
            "Time from sending an xDS response to Envoy's ACK, by type",
            labels=["type"],
        )
        for name in sorted(self.pushes):
            pushes.add_metric([name], self.pushes[name])
            nacks.add_metric([name], self.nacks[name])
            push_seconds.add_metric([name], self.acks[name], self.ack_seconds[name])
        yield from (pushes, nacks, push_seconds)


class PlaneCollector(Collector):
    def __init__(self, plane: Observed):
        self.plane = plane

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._routes()
        yield from self._xds()
        yield from self._config()
        yield from self._rollouts()
        yield from self._autoscaling()

    def _traffic(self) -> Iterator[Metric]:
        store = self.plane.store
        requests = CounterMetricFamily(
            "infergate_requests",
            "Requests through Envoy by model, version and status class (none: no response); "
            "scaled up by 1/sampling fraction",
            labels=["model", "version", "code_class"],
        )
        durations = HistogramMetricFamily(
            "infergate_request_duration_seconds",
            "Request duration as Envoy logged it",
            labels=["model", "version"],
        )
        for model, version in store.versions():
            for cls, n in sorted(store.totals(model, version).items()):
                requests.add_metric([model, version, cls], n)
            counts, total = store.histogram(model, version)
            cumulative, buckets = 0.0, []
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            durations.add_metric([model, version], buckets, total)
        yield requests
        yield durations
        yield self._consumers()
        yield GaugeMetricFamily(
            "infergate_telemetry_sample_fraction",
            "Fraction of requests that Envoy logs to the control plane",
            value=self.plane.sampler_fraction,
        )
        yield CounterMetricFamily(
            "infergate_telemetry_records",
            "Access log entries received from Envoys (not scaled)",
            value=store.records,
        )
        yield CounterMetricFamily(
            "infergate_telemetry_dropped_streams",
            "Access log streams closed because a message could not be decoded",
            value=self.plane.access_logs.dropped_streams,
        )

    def _consumers(self) -> Metric:
        consumers = CounterMetricFamily(
            "infergate_consumer_requests",
            "Requests by consumer (x-infergate-consumer; (anonymous) without one), model and "
            "outcome (ok, unauthorized, forbidden, too_large, rate_limited, over_quota, shed, "
            "client_error, error); scaled up by 1/sampling fraction",
            labels=["consumer", "model", "outcome"],
        )
        for (consumer, model), outcomes in self.plane.store.usage.totals().items():
            for kind, n in outcomes.items():
                consumers.add_metric([consumer, model, kind], n)
        return consumers

    def _routes(self) -> Iterator[Metric]:
        weights = GaugeMetricFamily(
            "infergate_route_weight",
            "Configured traffic weight of each version (the YAML's traffic)",
            labels=["model", "version"],
        )
        shadow = GaugeMetricFamily(
            "infergate_shadow_percent",
            "Percent of a model's requests mirrored to its shadow version",
            labels=["model", "version"],
        )
        config = self.plane.file_config
        for model in config.models if config else ():
            for version, weight in model.traffic:
                weights.add_metric([model.name, version], weight)
            if model.shadow:
                shadow.add_metric([model.name, model.shadow.version], model.shadow.percent)
        yield weights
        yield shadow

    def _xds(self) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            "infergate_xds_connected_envoys", "Connected Envoys by xDS mode", labels=["mode"]
        )
        modes: Counter[str] = Counter({"sotw": 0, "delta": 0})
        for node in self.plane.registry.nodes.values():
            modes[node.mode] += node.connected
        for mode, n in sorted(modes.items()):
            connected.add_metric([mode], n)
        yield connected
        yield from self.plane.xds_metrics.collect()

    def _config(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "infergate_config_reloads",
            "Routing file loads by result (ok, error)",
            labels=["result"],
        )
        for result in ("ok", "error"):
            reloads.add_metric([result], self.plane.reloads[result])
        yield reloads
        last = self.plane.last_reload_ok
        if last is not None:
            yield GaugeMetricFamily(
                "infergate_config_last_reload_success_age_seconds",
                "Seconds since the routing file last loaded successfully",
                value=time.monotonic() - last,
            )

    def _rollouts(self) -> Iterator[Metric]:
        phase = GaugeMetricFamily(
            "infergate_rollout_phase",
            "1 for the phase each model's rollout is in, 0 for the others",
            labels=["model", "phase"],
        )
        weight = GaugeMetricFamily(
            "infergate_rollout_canary_weight",
            "The weight the rollout gives its canary (0-100)",
            labels=["model", "canary"],
        )
        step = GaugeMetricFamily(
            "infergate_rollout_step", "The rollout's step (0: shadow phase)", labels=["model"]
        )
        decisions = CounterMetricFamily(
            "infergate_rollout_decisions",
            "Rollout decisions by kind (advance, hold, fail, rollback, promote, ...)",
            labels=["model", "kind"],
        )
        for model, s in self.plane.rollouts.status().items():
            for name in PHASES:
                phase.add_metric([model, name], float(s["phase"] == name))
            weight.add_metric([model, s["canary"]], s["canary_weight"])
            step.add_metric([model], s["step"])
            for kind, n in sorted(s["decisions"].items()):
                decisions.add_metric([model, kind], n)
        yield from (phase, weight, step, decisions)

    def _autoscaling(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        desired = GaugeMetricFamily(
            "infergate_autoscaler_desired_replicas", "The autoscaler's last decision", labels=labels
        )
        ready = GaugeMetricFamily(
            "infergate_autoscaler_ready_replicas", "Ready replicas when it decided", labels=labels
        )
        concurrency = GaugeMetricFamily(
            "infergate_autoscaler_concurrency",
            "Average concurrency over the stable and the panic window",
            labels=[*labels, "window"],
        )
        panic = GaugeMetricFamily("infergate_autoscaler_panic", "1 in panic mode", labels=labels)
        for key, d in sorted(self.plane.autoscaling.items()):
            model_version = key.split("/", 1)
            desired.add_metric(model_version, d["desired"])
            ready.add_metric(model_version, d["ready"])
            concurrency.add_metric([*model_version, "stable"], d["stable_concurrency"])
            concurrency.add_metric([*model_version, "panic"], d["panic_concurrency"])
            panic.add_metric(model_version, float(d["panic"]))
        yield from (desired, ready, concurrency, panic)


def make_registry(plane: Observed) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlaneCollector(plane))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
