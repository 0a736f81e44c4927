"""Convergence: from an atomic rewrite of the routing file to Envoy serving the new routes."""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from bench.stack import BenchStack
from bench.stats import summary_ms
from control_plane.translate import cluster_name

POLL = 0.002  # seconds between polls of each admin endpoint


def route_weights(dump: dict[str, Any]) -> list[dict[str, int]]:
    """Every weighted split in a route config dump, as {cluster: weight}."""
    splits = []
    for vhost in dump.get("route_config", {}).get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
            if clusters:
                splits.append({c["name"]: int(c.get("weight", 0)) for c in clusters})
    return splits


def _wait_envoy(stack: BenchStack, expected: dict[str, int], timeout: float) -> tuple[float, str]:
    """Poll Envoy's config dump until a route carries `expected`; return (time, version_info)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        dump = stack.route_dump()
        if expected in route_weights(dump):
            return time.perf_counter(), dump.get("version_info", "")
        time.sleep(POLL)
    raise TimeoutError(f"Envoy did not load weights {expected} within {timeout}s")


def _wait_ack(stack: BenchStack, previous_rds: str, timeout: float) -> tuple[float, float, str]:
    """Poll /status until a new RDS version is ACKed; return (time, applied_at, version)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        st = stack.status()
        rds = (st["snapshot"] or {}).get("types", {}).get("rds")
        nodes = [n for n in st["nodes"] if n["connected"]]
        if (
            rds
            and rds != previous_rds
            and nodes
            and all(n["types"].get("rds", {}).get("acked_version") == rds for n in nodes)
        ):
            return time.perf_counter(), st["config"]["applied_at"], rds
        time.sleep(POLL)
    raise TimeoutError(f"control plane saw no ACK of a new RDS version within {timeout}s")


def run(stack: BenchStack, edits: int = 20, timeout: float = 10.0) -> dict[str, Any]:
    """Apply `edits` weight changes; time control-plane apply, Envoy load and ACK for each.

    The ACK is looked for only once Envoy shows the route, so it is never earlier than that.
    """
    applied, envoy, acked, mismatches = [], [], [], 0
    rng = random.Random(0)
    rds = stack.status()["snapshot"]["types"]["rds"]
    for i in range(edits):
        time.sleep(rng.uniform(0.1, 0.3))  # land at a random phase of the 50 ms file poll
        v2 = 1 + i % 98  # never equal to the previous edit
        traffic = {"v1": 100 - v2, "v2": v2}
        expected = {cluster_name("iris", v): w for v, w in traffic.items()}
        wall0, t0 = time.time(), time.perf_counter()
        stack.route(traffic)
        # Watch Envoy alone first, so that polling /status does not slow the control plane.
        t_envoy, envoy_version = _wait_envoy(stack, expected, timeout)
        t_ack, applied_at, rds = _wait_ack(stack, rds, timeout)
        mismatches += envoy_version != rds
        applied.append(applied_at - wall0)
        envoy.append(t_envoy - t0)
        acked.append(t_ack - t0)
        print(
            f"  edit {i + 1}/{edits}: applied {applied[-1] * 1000:6.1f} ms, "
            f"in Envoy {envoy[-1] * 1000:6.1f} ms, ACKed {acked[-1] * 1000:6.1f} ms",
            file=sys.stderr,
        )
    return {
        "edits": edits,
        "poll_interval_ms": POLL * 1000,
        "control_plane_applied": summary_ms(applied),
        "envoy_route_loaded": summary_ms(envoy),
        "control_plane_saw_ack": summary_ms(acked),
        # The control plane's own log: parse + translate + serialize, per edit.
        "control_plane_build": summary_ms([ms / 1000 for ms in stack.apply_times_ms()[-edits:]]),
        "envoy_version_mismatches": mismatches,
        "per_edit_ms": {
            "applied": [round(x * 1000, 2) for x in applied],
            "envoy": [round(x * 1000, 2) for x in envoy],
            "acked": [round(x * 1000, 2) for x in acked],
        },
    }
