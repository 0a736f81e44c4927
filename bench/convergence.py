"""Convergence: from an atomic rewrite of the routing file to Envoy serving the new routes.

`python -m bench.convergence` runs this alone (one model server, the control plane, one
Envoy), optionally side by side with the control plane of another source tree
(`--baseline DIR`, e.g. an older commit unpacked with `git archive`), alternating rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from bench.stack import BenchStack
from bench.stats import alternating, emit, summary_ms
from bench.workdir import scratch_dir
from control_plane.translate import cluster_name, model_routes_name

POLL = 0.001  # seconds between polls of each admin endpoint
# The steps of one edit, as (name, from, to): wall-clock times of the bench ("saved",
# "in_envoy"), of the control plane's /status (config.timings, applied_at) and of the
# Envoy's node status (rds sent_at, acked_at).
STEPS = (
    ("event", "saved", "changed_at"),  # rename to the watcher handling the change
    ("parse", "changed_at", "parsed_at"),
    ("to_build", "parsed_at", "build_started_at"),  # the publisher task picking it up
    ("build", "build_started_at", "built_at"),  # merge + translate + serialize (a thread)
    ("publish", "built_at", "applied_at"),
    ("push", "applied_at", "sent_at"),  # the stream wakes and hands the RDS to gRPC
    ("envoy_apply", "sent_at", "acked_at"),  # gRPC write, Envoy applies and ACKs
    ("seen", "acked_at", "in_envoy"),  # the ACK read to our config-dump poll seeing it
)


class EnvoyAdmin:
    """Envoy's admin interface over one kept-alive HTTP connection (a poll costs less)."""

    def __init__(self, host: str, port: int):
        self.conn = http.client.HTTPConnection(host, port, timeout=5)

    def route_dump(self) -> dict[str, Any]:
        """Envoy's dump of iris's route configuration (one per model, by scoped routes)."""
        self.conn.request("GET", "/config_dump?resource=dynamic_route_configs")
        configs = json.loads(self.conn.getresponse().read()).get("configs", [])
        iris = model_routes_name("iris")
        return next((c for c in configs if c["route_config"]["name"] == iris), {})


def route_weights(dump: dict[str, Any]) -> list[dict[str, int]]:
    """Every weighted split in a route config dump, as {cluster: weight}."""
    splits = []
    for vhost in dump.get("route_config", {}).get("virtual_hosts", []):
        for route in vhost.get("routes", []):
            clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
            if clusters:
                splits.append({c["name"]: int(c.get("weight", 0)) for c in clusters})
    return splits


def _wait_envoy(envoy: EnvoyAdmin, expected: dict[str, int], timeout: float) -> tuple[float, str]:
    """Poll Envoy's config dump until a route carries `expected`; return (wall time, version)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        dump = envoy.route_dump()
        if expected in route_weights(dump):
            return time.time(), dump.get("version_info", "")
        time.sleep(POLL)
    raise TimeoutError(f"Envoy did not load weights {expected} within {timeout}s")


def _wait_ack(stack: BenchStack, previous_rds: str, timeout: float) -> dict[str, Any]:
    """Poll /status until a new RDS version is ACKed; return that status."""
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
            return st
        time.sleep(POLL)
    raise TimeoutError(f"control plane saw no ACK of a new RDS version within {timeout}s")


def _times(st: dict[str, Any], saved: float, in_envoy: float) -> dict[str, float]:
    """The wall-clock times of one edit's steps (a control plane without `timings`, as
    before they were added, gives only `applied_at`)."""
    rds = next(n for n in st["nodes"] if n["connected"])["types"]["rds"]
    return {
        "saved": saved,
        "in_envoy": in_envoy,
        **(st["config"].get("timings") or {}),
        "applied_at": st["config"]["applied_at"],
        "sent_at": rds["sent_at"],
        "acked_at": rds["acked_at"],
    }


def run(stack: BenchStack, edits: int = 20, timeout: float = 10.0) -> dict[str, Any]:
    """Apply `edits` weight changes; time control-plane apply, Envoy load and ACK for each,
    and each step of the way (`breakdown`).

    The ACK is looked for only once Envoy shows the route, so it is never earlier than that.
    """
    envoy = EnvoyAdmin(*stack.envoy_admin)
    per_edit: list[dict[str, float]] = []
    mismatches = 0
    rng = random.Random(0)
    rds = stack.status()["snapshot"]["types"]["rds"]
    for i in range(edits):
        time.sleep(rng.uniform(0.1, 0.3))  # land at a random phase of any poll
        v2 = 1 + i % 98  # never equal to the previous edit
        traffic = {"v1": 100 - v2, "v2": v2}
        expected = {cluster_name("iris", v): w for v, w in traffic.items()}
        saved = time.time()
        stack.route(traffic)
        # Watch Envoy alone first, so that polling /status does not slow the control plane.
        in_envoy, envoy_version = _wait_envoy(envoy, expected, timeout)
        st = _wait_ack(stack, rds, timeout)
        rds = st["snapshot"]["types"]["rds"]
        mismatches += envoy_version != rds
        per_edit.append(_times(st, saved, in_envoy))
        t = per_edit[-1]
        print(
            f"  edit {i + 1}/{edits}: applied {(t['applied_at'] - saved) * 1000:6.1f} ms, "
            f"in Envoy {(in_envoy - saved) * 1000:6.1f} ms",
            file=sys.stderr,
        )

    def since_save(key: str) -> dict[str, float]:
        return summary_ms([t[key] - t["saved"] for t in per_edit])

    return {
        "edits": edits,
        "poll_interval_ms": POLL * 1000,
        "control_plane_applied": since_save("applied_at"),
        "envoy_route_loaded": since_save("in_envoy"),
        "control_plane_saw_ack": since_save("acked_at"),
        "breakdown": {
            name: summary_ms([t[end] - t[start] for t in per_edit])
            for name, start, end in STEPS
            if all(start in t and end in t for t in per_edit)
        },
        # The control plane's own log: parse + translate + serialize, per edit.
        "control_plane_build": summary_ms([ms / 1000 for ms in stack.apply_times_ms()[-edits:]]),
        "envoy_version_mismatches": mismatches,
        "per_edit_ms": {
            "applied": [round((t["applied_at"] - t["saved"]) * 1000, 2) for t in per_edit],
            "envoy": [round((t["in_envoy"] - t["saved"]) * 1000, 2) for t in per_edit],
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__)
    p.add_argument("--repository", default="examples/models", help="trained model repository")
    p.add_argument("--edits", type=int, default=20, help="edits per round (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per control plane (default 1)")
    p.add_argument("--watch", default="notify", choices=("notify", "poll", "auto"))
    p.add_argument("--baseline", type=Path, help="source tree of a control plane to compare")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = {"current": None} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    report: dict[str, Any] = {"load_average_before": os.getloadavg(), "watch": args.watch}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    with (
        scratch_dir("infergate-convergence-") as workdir,
        BenchStack(workdir, Path(args.repository).resolve()) as stack,
    ):
        for i in range(args.rounds):
            for name in alternating(list(sources), i):
                stack.start_control_plane(args.watch, sources[name])
                stack.wait_converged()
                print(f"convergence, {name}, round {i + 1} ({args.edits} edits)", file=sys.stderr)
                results[name].append(run(stack, edits=args.edits))
    report["load_average_after"] = os.getloadavg()
    report["rounds"] = results
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
