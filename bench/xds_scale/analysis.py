"""Where the control plane's time goes: a profile of one build, and the per-stream cost
of pushing one edit (in-process, no gRPC)."""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from typing import Any

from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest

from bench.xds_scale.configs import routing_yaml
from control_plane.callbacks import NodeInfo
from control_plane.config import parse
from control_plane.nodes import NodeRegistry
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE, build_snapshot
from control_plane.streams import DeltaStream, DesiredCache, SotwStream, Stream
from control_plane.translate import translate


def profile_build(models: int, top: int = 12) -> list[dict[str, Any]]:
    """cProfile of parse + translate + build_snapshot: the functions with most own time."""
    text = routing_yaml(models)
    profiler = cProfile.Profile()
    profiler.enable()
    build_snapshot(translate(parse(text)), "e")
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{path.rsplit('site-packages/', 1)[-1]}:{line}({name})",
                "calls": calls,
                "own_s": round(own, 3),
                "cumulative_s": round(cum, 3),
            }
        )
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:top]


def _converged(stream: Stream, delta: bool) -> None:
    """Walk a stream through the handshake in-process (the same order as SimEnvoy)."""

    def request(type_url: str, names: list[str] | None = None, nonce: str = "") -> None:
        if delta:
            stream.handle_request(
                DeltaDiscoveryRequest(
                    type_url=type_url, resource_names_subscribe=names or [], response_nonce=nonce
                )
            )
        else:
            stream.handle_request(
                DiscoveryRequest(
                    type_url=type_url, resource_names=names or [], response_nonce=nonce
                )
            )

    snapshot = stream.target
    assert snapshot is not None
    clusters = sorted(snapshot.types[CLUSTER].resources)
    steps = [
        (CLUSTER, None),
        (ENDPOINT, clusters),
        (LISTENER, None),
        (SCOPED_ROUTE, None),
        (ROUTE, sorted(snapshot.types[ROUTE].resources)),
    ]
    for type_url, names in steps:
        request(type_url, names)
        stream.responses()
        ack_names = None if delta else names  # a Delta ACK carries no subscriptions
        request(type_url, ack_names, stream.types[type_url].last_nonce or "")
    stream.responses()


def per_stream_push_ms(models: int, streams: int = 20, delta: bool = False) -> float:
    """Control-plane CPU per stream for one weight edit: the snapshot event, the RDS
    response, and handling the ACK (median per stream, milliseconds; no gRPC)."""
    text = routing_yaml(models)
    first = build_snapshot(translate(parse(text)), "e")
    second = build_snapshot(translate(parse(routing_yaml(models, 1))), "e")
    cls = DeltaStream if delta else SotwStream
    desired, registry = DesiredCache(), NodeRegistry()
    fleet = [cls(NodeInfo(f"n{i}"), registry, time.monotonic, desired) for i in range(streams)]
    for stream in fleet:
        stream.open()
        stream.target = first
        _converged(stream, delta)
    runs = []
    for stream in fleet:
        started = time.perf_counter()
        stream.target = second
        out = stream.responses().responses
        nonce = stream.types[ROUTE].last_nonce or ""
        if delta:
            stream.handle_request(DeltaDiscoveryRequest(type_url=ROUTE, response_nonce=nonce))
        else:
            stream.handle_request(
                DiscoveryRequest(
                    type_url=ROUTE,
                    resource_names=sorted(second.types[ROUTE].resources),
                    response_nonce=nonce,
                )
            )
        stream.responses()
        runs.append(time.perf_counter() - started)
        assert len(out) == 1, "expected one RDS response"
    return round(statistics.median(runs) * 1000, 3)
