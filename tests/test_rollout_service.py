"""The rollout controller inside the control plane: weights in the snapshot, GET /rollouts,
a hold without traffic, a restart that resumes from the state directory, and the operator's
actions through the admin API and `infergate rollout`, with their Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.any_pb2 import Any as AnyProto

from control_plane.service import ControlPlane
from control_plane.snapshot import ROUTE
from gateway.cli import main
from gateway.processes import free_port
from tests.test_rollout import ALL_ON_V1

ROUTING = ALL_ON_V1 + (
    "    rollout: {canary: v2, steps: [10, 50], interval: 1s, hold_timeout: 10m}\n"
)


def weights(plane: ControlPlane) -> dict[str, int]:
    """Cluster weights of the model's split route in the current snapshot (one cluster: 100;
    versions at 0 are left out of the route)."""
    found = {}
    for blob in plane.cache.snapshot.types[ROUTE].resources.values():
        config = RouteConfiguration.FromString(AnyProto.FromString(blob).value)
        for host in config.virtual_hosts:
            for route in host.routes:
                if route.name != "iris/split":
                    continue
                if route.route.cluster:
                    found[route.route.cluster] = 100
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


async def test_rollout_actions_through_the_admin_api_cli_and_metrics(tmp_path, capsys):
    (tmp_path / "routing.yaml").write_text(ROUTING)
    (tmp_path / "token").write_text("s3cret\n")
    plane = ControlPlane(
        tmp_path / "routing.yaml",
        ("127.0.0.1", free_port()),
        ("127.0.0.1", free_port()),
        admin_token="s3cret",
        health_interval=0,
        state_dir=tmp_path / "state",
    )
    await plane.start()
    admin = f"http://127.0.0.1:{plane.admin_address[1]}"

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["rollout", *args, "--admin-url", admin])
        out = capsys.readouterr()
        return code, out.out, out.err

    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{admin}/rollouts/iris/pause") as resp:
                assert resp.status == 401 and "token" in (await resp.json())["error"]
        token = ("--admin-token-file", str(tmp_path / "token"))
        code, out, _ = await asyncio.to_thread(cli, "pause", "iris", *token)
        assert code == 0 and "iris: paused" in out and "paused by the operator" in out
        code, _, err = await asyncio.to_thread(cli, "pause", "iris", *token)
        assert code == 2 and "is paused, not running" in err  # 409 from the API
        code, _, err = await asyncio.to_thread(cli, "pause", "nope", *token)
        assert code == 2 and "no rollout for model 'nope'" in err  # 404
        code, out, _ = await asyncio.to_thread(cli, "resume", "iris", *token)
        assert code == 0 and "iris: progressing" in out
        assert weights(plane) == {"iris/v1": 90, "iris/v2": 10}
        code, out, _ = await asyncio.to_thread(cli, "abort", "iris", *token)
        assert code == 0 and "iris: rolled_back" in out
        deadline = time.monotonic() + 10  # the abort publishes at once, no tick needed
        while weights(plane) != {"iris/v1": 100}:
            assert time.monotonic() < deadline, weights(plane)
            await asyncio.sleep(0.05)
        code, out, _ = await asyncio.to_thread(cli, "status", "iris", "--json")
        status = json.loads(out)["iris"]
        assert [d["kind"] for d in status["history"]] == ["start", "pause", "resume", "abort"]
        assert abs(status["history"][-1]["time"] - time.time()) < 60  # Unix time
        code, out, _ = await asyncio.to_thread(cli, "status")
        assert "DECISION" in out and "aborted by the operator" in out
        async with aiohttp.ClientSession() as http, http.get(f"{admin}/metrics") as resp:
            metrics = await resp.text()
        assert 'infergate_rollout_phase{model="iris",phase="rolled_back"} 1.0' in metrics
        assert 'infergate_rollout_phase{model="iris",phase="progressing"} 0.0' in metrics
        assert 'infergate_rollout_canary_weight{canary="v2",model="iris"} 0.0' in metrics
        assert 'infergate_rollout_decisions_total{kind="abort",model="iris"} 1.0' in metrics
        assert "traffic: {v1: 100, v2: 0}" in (tmp_path / "routing.yaml").read_text()
    finally:
        await plane.stop()
