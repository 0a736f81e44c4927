"""The rollout controller inside the control plane: weights in the snapshot, GET /rollouts,
a hold without traffic, and a restart that resumes from the state directory."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any as AnyProto

from control_plane.service import ControlPlane
from control_plane.snapshot import ROUTE
from gateway.processes import free_port

ROUTING = """\
models:
  iris:
    versions:
      v1: {endpoints: [127.0.0.1:9001]}
      v2: {endpoints: [127.0.0.1:9002]}
    traffic: {v1: 100}
    rollout: {canary: v2, steps: [10, 50], interval: 1s, hold_timeout: 10m}
"""


def weights(plane: ControlPlane) -> dict[str, int]:
    """Cluster weights of the model's split route in the current snapshot."""
    found = {}
    for blob in plane.cache.snapshot.types[ROUTE].resources.values():
        config = RouteConfiguration.FromString(AnyProto.FromString(blob).value)
        for host in config.virtual_hosts:
            for route in host.routes:
                for cluster in route.route.weighted_clusters.clusters:
                    found[cluster.name] = cluster.weight.value
    return found


async def rollouts(plane: ControlPlane) -> dict:
    url = f"http://127.0.0.1:{plane.admin_address[1]}/rollouts"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return (await resp.json())["rollouts"]


async def started(tmp_path) -> ControlPlane:
    plane = ControlPlane(
        tmp_path / "routing.yaml",
        ("127.0.0.1", free_port()),
        ("127.0.0.1", free_port()),
        health_interval=0,
        state_dir=tmp_path / "state",
    )
    await plane.start()
    return plane


async def test_rollout_weights_status_hold_and_restart(tmp_path):
    (tmp_path / "routing.yaml").write_text(ROUTING)
    plane = await started(tmp_path)
    try:
        assert weights(plane) == {"iris/v1": 90, "iris/v2": 10}
        status = (await rollouts(plane))["iris"]
        assert (status["phase"], status["step"], status["canary_weight"]) == ("progressing", 1, 10)
        deadline = time.monotonic() + 30
        while (await rollouts(plane))["iris"]["history"][-1]["kind"] != "hold":
            assert time.monotonic() < deadline, "no hold decision"
            await asyncio.sleep(0.1)
        status = (await rollouts(plane))["iris"]
        assert status["phase"] == "progressing" and "0 of 100 canary requests" in status["reason"]
        assert weights(plane) == {"iris/v1": 90, "iris/v2": 10}
    finally:
        await plane.stop()
    again = await started(tmp_path)
    try:
        resumed = (await rollouts(again))["iris"]
        assert resumed["history"][: len(status["history"])] == status["history"]
        assert (resumed["step"], resumed["canary_weight"]) == (1, 10)
        assert weights(again) == {"iris/v1": 90, "iris/v2": 10}
    finally:
        await again.stop()
