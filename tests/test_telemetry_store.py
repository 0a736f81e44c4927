"""The telemetry store with an injected clock: windows, intervals, scaling, bounds."""

from __future__ import annotations

import pytest

from control_plane.telemetry import (
    IntervalStats,
    RequestRecord,
    TelemetryStore,
    histogram_quantile,
    is_error,
    status_class,
)
from tests.fake_clock import FakeClock


def rec(version: str = "v1", code: int = 200, flags: str = "", duration: float = 0.01):
    return RequestRecord("iris", version, code, flags, duration, "id")


def test_window_counts_rates_percentiles_and_concurrency():
    clock = FakeClock()
    store = TelemetryStore(clock)
    for i in range(100):  # 100 requests over 10 s, durations 1..100 ms
        store.add(rec(duration=(i + 1) / 1000))
        clock.now += 0.1
    w = store.window("iris", "v1", 10)
    assert w["requests"] == 100
    assert w["requests_per_second"] == pytest.approx(10)
    assert w["error_rate"] == 0
    assert (w["p50"], w["p95"], w["p99"]) == (0.05, 0.095, 0.099)
    assert w["concurrency"] == pytest.approx(sum(range(1, 101)) / 1000 / 10)
    assert w["status_classes"] == {"2xx": 100}


def test_old_requests_leave_the_window():
    clock = FakeClock()
    store = TelemetryStore(clock)
    store.add(rec(code=500))
    clock.now += 30
    store.add(rec())
    assert store.window("iris", "v1", 10)["requests"] == 1
    assert store.window("iris", "v1", 10)["error_rate"] == 0
    assert store.window("iris", "v1", 60)["requests"] == 2
    assert store.window("iris", "v1", 60)["error_rate"] == 0.5


def test_interval_and_scaling_by_sampling_weight():
    clock = FakeClock()
    store = TelemetryStore(clock)
    start = clock.now
    store.add(rec(duration=0.2), weight=4)  # sampled at 25%
    clock.now += 5
    middle = clock.now
    store.add(rec(code=503, flags="UF", duration=0.3), weight=4)
    assert store.window("iris", "v1", 10)["local_failures"] == 4
    clock.now += 5
    assert store.interval("iris", "v1", start) == IntervalStats(8, 4, (0.2, 0.3), 2, 1)
    assert store.interval("iris", "v1", middle) == IntervalStats(4, 4, (0.3,), 1, 1)
    assert store.interval("iris", "v1", start, middle) == IntervalStats(4, 0, (0.2,), 1, 0)
    assert store.interval("iris", "v2", start) == IntervalStats(0, 0, (), 0, 0)
    assert store.totals("iris", "v1") == {"2xx": 4, "5xx": 4}


def test_versions_are_kept_apart():
    store = TelemetryStore(FakeClock())
    store.add(rec("v1"))
    store.add(rec("v2", code=500))
    assert store.versions() == [("iris", "v1"), ("iris", "v2")]
    assert store.window("iris", "v1", 10)["error_rate"] == 0
    assert store.window("iris", "v2", 10)["error_rate"] == 1


def test_durations_are_bounded_to_the_newest():
    store = TelemetryStore(FakeClock(), max_durations=3)
    for d in (1, 2, 3, 4, 5):
        store.add(rec(duration=d))
    assert store.interval("iris", "v1", 0).durations == (3, 4, 5)
    assert store.interval("iris", "v1", 0).requests == 5


def test_history_keeps_15_minutes_in_10_second_steps():
    clock = FakeClock(0.0)
    store = TelemetryStore(clock)
    for _ in range(200):  # one request per 10 s for 2,000 s
        store.add(rec(duration=0.004))
        clock.now += 10
    history = store.history("iris", "v1")
    assert len(history) == 90
    assert history[-1]["t"] == 1990
    assert history[-1]["requests_per_second"] == pytest.approx(0.1)
    assert history[-1]["p99"] == 0.005


def test_errors_are_5xx_and_envoy_local_failures():
    assert not is_error(rec(code=404))
    assert is_error(rec(code=500))
    assert is_error(rec(code=0))
    assert is_error(rec(code=200, flags="URX,UF"))  # a local failure, whatever the code
    assert not is_error(rec(code=200, flags="DC"))
    assert status_class(0) == "none"
    assert status_class(503) == "5xx"


def test_histogram_quantile():
    assert histogram_quantile([], 0.99) is None
    counts = [0.0] * 15
    counts[3] = 99
    counts[14] = 1
    assert histogram_quantile(counts, 0.99) == 0.005
    assert histogram_quantile(counts, 1.0) == 10.0
