"""The xDS metrics callbacks with an injected clock, read as Prometheus samples."""

from __future__ import annotations

from control_plane.callbacks import NodeInfo
from control_plane.metrics import XdsMetrics
from control_plane.snapshot import CLUSTER, ROUTE


def samples(metrics: XdsMetrics) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels["type"]): s.value for family in metrics.collect() for s in family.samples
    }


def test_pushes_nacks_and_push_to_ack_time_by_type():
    now = [100.0]
    metrics = XdsMetrics(clock=lambda: now[0])
    a, b = NodeInfo("a"), NodeInfo("b")
    metrics.on_sent(a, CLUSTER, "v1", 3)
    metrics.on_sent(b, CLUSTER, "v1", 3)
    now[0] += 0.25
    metrics.on_ack(a, CLUSTER, "v1")
    metrics.on_nack(b, CLUSTER, "v1", "bad cluster")
    metrics.on_sent(a, ROUTE, "v1", 1)
    metrics.on_disconnect(a)  # no ACK will come
    metrics.on_ack(a, ROUTE, "v1")
    assert samples(metrics) == {
        ("infergate_xds_pushes_total", "cds"): 2,
        ("infergate_xds_nacks_total", "cds"): 1,
        ("infergate_xds_push_duration_seconds_count", "cds"): 1,
        ("infergate_xds_push_duration_seconds_sum", "cds"): 0.25,
        ("infergate_xds_pushes_total", "rds"): 1,
        ("infergate_xds_nacks_total", "rds"): 0,
        ("infergate_xds_push_duration_seconds_count", "rds"): 0,
        ("infergate_xds_push_duration_seconds_sum", "rds"): 0,
    }
