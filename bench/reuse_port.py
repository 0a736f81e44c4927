"""Envoy throughput with the gateway listener's SO_REUSEPORT on and off (issue 8.1).

Two Envoys run static copies of the translator's output for one model server: the same
listener, routes and clusters, each on its own port, differing only in `enable_reuse_port`.
wrk loads each in turn, interleaved (the one that goes first alternates), at one
concurrency, on two paths: inference (through Envoy to the model server) and Envoy's own
direct health response. Prints one JSON document: per path, medians per variant and the
median per-round ratio off/on.

    python -m bench.reuse_port [--rounds 5] [--seconds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (  # noqa: E501
    HttpConnectionManager,
)
from google.protobuf.json_format import MessageToDict

from bench.__main__ import machine
from bench.load import IRIS_PATH, LoadResult, WrkLoad, load_generator, medians
from bench.stats import alternating, emit, median
from bench.workdir import scratch_dir
from control_plane.config import parse
from control_plane.resources import Resources
from control_plane.translate import LISTENER_NAME, translate
from gateway.bootstrap import envoy_command
from gateway.envoy_proxy import envoy_path
from gateway.processes import Child, free_port, model_server_child, wait_http

LOCAL = "127.0.0.1"
VARIANTS = {"reuse_port_on": True, "reuse_port_off": False}
HEALTH_PATH = "/v2/health/ready"  # answered by Envoy itself


def static_bootstrap(resources: Resources, admin: int, reuse_port: bool) -> dict[str, Any]:
    """An Envoy bootstrap holding the translated resources statically (routes inline,
    endpoints in the clusters), with the listener's `enable_reuse_port` set as given."""
    listener = Listener()
    listener.CopyFrom(resources.listeners[LISTENER_NAME])
    listener.enable_reuse_port.value = reuse_port
    hcm = HttpConnectionManager()
    packed = listener.filter_chains[0].filters[0].typed_config
    packed.Unpack(hcm)
    for translated in resources.scoped_routes.values():  # inline, instead of SRDS and RDS
        scope = hcm.scoped_routes.scoped_route_configurations_list.scoped_route_configurations.add()
        scope.CopyFrom(translated)
        scope.route_configuration.CopyFrom(resources.routes[translated.route_configuration_name])
        scope.ClearField("route_configuration_name")
    packed.Pack(hcm)
    clusters = []
    for name, translated in resources.clusters.items():
        cluster = Cluster()
        cluster.CopyFrom(translated)
        cluster.type = Cluster.STATIC
        cluster.ClearField("eds_cluster_config")
        cluster.load_assignment.CopyFrom(resources.endpoints[name])
        clusters.append(MessageToDict(cluster))
    return {
        "admin": {"address": {"socket_address": {"address": LOCAL, "port_value": admin}}},
        "static_resources": {"listeners": [MessageToDict(listener)], "clusters": clusters},
    }


def start_envoy(workdir: Path, name: str, model_port: int, reuse_port: bool) -> tuple[Child, str]:
    """One Envoy in front of the model server; returns it and its base URL."""
    listen, admin = free_port(), free_port()
    text = f"listen: {LOCAL}:{listen}\nmodels:\n  iris:\n    versions:\n"
    text += f"      v1: {{endpoints: [{LOCAL}:{model_port}]}}\n"
    bootstrap = workdir / f"envoy-{name}.json"
    bootstrap.write_text(json.dumps(static_bootstrap(translate(parse(text)), admin, reuse_port)))
    argv = envoy_command(envoy_path(), str(bootstrap), "warning")
    envoy = Child(f"envoy {name}", argv, str(workdir / f"envoy-{name}.log")).start()
    wait_http(f"http://{LOCAL}:{admin}/ready", timeout=30, child=envoy)
    return envoy, f"http://{LOCAL}:{listen}"


def compare(
    load: WrkLoad, bases: dict[str, str], path: str, rounds: int, seconds: float, concurrency: int
) -> dict[str, Any]:
    """Both variants on one path: interleaved rounds, medians, median per-round ratio."""
    per: dict[str, list[LoadResult]] = {name: [] for name in bases}
    for base in bases.values():
        load.run(base + path, concurrency, 1.0)  # warm-up
    for i in range(rounds):
        for name in alternating(list(bases), i):
            result = load.run(bases[name] + path, concurrency, seconds)
            per[name].append(result)
            print(
                f"  {path} round {i + 1}/{rounds} {name}: {result.rps:8.1f} req/s", file=sys.stderr
            )
    ratios = [
        off.rps / on.rps
        for on, off in zip(per["reuse_port_on"], per["reuse_port_off"], strict=True)
    ]
    return {
        "path": path,
        **{name: medians(results) for name, results in per.items()},
        "off_over_on_rps": round(median(ratios), 3),
        "per_round": {name: [r.as_dict() for r in rs] for name, rs in per.items()},
    }


def run(
    repository: Path, load: WrkLoad, rounds: int, seconds: float, concurrency: int
) -> dict[str, Any]:
    """Inference through Envoy to the model server, and Envoy's own direct health response
    (Envoy alone, without the Python model server as the bottleneck)."""
    children: list[Child] = []
    with scratch_dir("infergate-reuse-port-") as workdir:
        try:
            model_port = free_port()
            log = str(workdir / "model.log")
            model = model_server_child(str(repository), "iris", "v1", (LOCAL, model_port), log)
            children.append(model.start())
            wait_http(f"http://{LOCAL}:{model_port}/v2/health/ready", child=model)
            bases = {}
            for name, reuse in VARIANTS.items():  # ready after its first health check
                envoy, bases[name] = start_envoy(workdir, name, model_port, reuse)
                children.append(envoy)
            return {
                kind: compare(load, bases, path, rounds, seconds, concurrency)
                for kind, path in (("inference", IRIS_PATH), ("envoy_direct_response", HEALTH_PATH))
            }
        finally:
            for child in reversed(children):
                child.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reuse_port", description=__doc__)
    p.add_argument("--repository", default="examples/models", help="trained model repository")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    load = load_generator("wrk")
    if not isinstance(load, WrkLoad):
        print("wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    report = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "load_generator": "wrk",
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "envoy_workers": "default (one per core)",
    }
    with closing(load):
        report |= run(
            Path(args.repository).resolve(), load, args.rounds, args.seconds, args.concurrency
        )
    return emit(report)


if __name__ == "__main__":
    sys.exit(main())
