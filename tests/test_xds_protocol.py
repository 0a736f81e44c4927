"""ADS over real gRPC, decoded with envoy-data-plane (an independent protobuf runtime):
wire compatibility, and what `/status` and `infergate status` show. The protocol rules
themselves are tested without a network in `test_streams.py`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster

from control_plane.callbacks import LISTEN_METADATA
from control_plane.service import ControlPlane
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE
from control_plane.translate import GATEWAY_ROUTES, model_routes_name
from gateway.cli import main as cli_main
from gateway.processes import free_port, host_port
from tests.test_config import BASE as TWO_VERSIONS
from tests.xds_client import AdsClient

# The route configurations of TWO_VERSIONS: the gateway's own paths, and iris's.
ROUTE_NAMES = [GATEWAY_ROUTES, model_routes_name("iris")]


def cluster_names(resp) -> set[str]:
    return {Cluster.FromString(r.value).name for r in resp.resources}


@pytest.fixture
async def client(plane):
    c = await AdsClient(host_port(plane.xds_address)).start()
    yield c
    await c.close()


async def converge(c: AdsClient) -> dict:
    """Walk the initial handshake the way Envoy does; return the last response per type."""
    await c.send(CLUSTER)
    return await finish_handshake(c, await c.recv())


async def finish_handshake(c: AdsClient, cds) -> dict:
    """The handshake after the first CDS response."""
    last = {CLUSTER: cds}
    names = sorted(cluster_names(cds))
    await c.send(ENDPOINT, names)
    last[ENDPOINT] = eds = await c.recv()
    await c.ack(eds, names)
    await c.ack(cds)  # Envoy ACKs clusters once they are warm
    await c.send(LISTENER)
    last[LISTENER] = lds = await c.recv()
    await c.ack(lds)
    await c.send(SCOPED_ROUTE)
    last[SCOPED_ROUTE] = srds = await c.recv()
    await c.ack(srds)
    await c.send(ROUTE, ROUTE_NAMES)
    last[ROUTE] = rds = await c.recv()
    await c.ack(rds, ROUTE_NAMES)
    return last


async def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll until `condition()` is truthy (the server handles requests asynchronously)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.01)
    return value


def edit(plane: ControlPlane, text: str) -> None:
    plane.config_path.write_text(text)
    plane.watcher.check()


async def test_handshake_serves_every_type_with_epoch_versions(plane, client):
    last = await converge(client)
    assert cluster_names(last[CLUSTER]) == {"iris/v1", "iris/v2"}
    assert len(last[ENDPOINT].resources) == 2
    for resp in last.values():
        assert resp.version_info.startswith(plane.epoch + "-")
    await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["acked_version"])
    node = plane.status()["nodes"][0]
    assert (node["node_id"], node["connected"], node["mode"]) == ("sim-1", True, "sotw")
    assert {t["acked_version"] for t in node["types"].values()} == {
        r.version_info for r in last.values()
    }


async def test_nack_is_recorded_and_not_resent_then_next_snapshot_is_sent(plane, client):
    last = await converge(client)
    edit(plane, TWO_VERSIONS.replace("90, v2: 10", "50, v2: 50"))
    rds = await client.recv()
    assert rds.type_url == ROUTE and rds.version_info != last[ROUTE].version_info
    await client.send(
        ROUTE,
        ROUTE_NAMES,
        last[ROUTE].version_info,
        rds.nonce,
        error="weights rejected for test",
    )
    rds_status = await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["nack"])
    assert (rds_status["version"], rds_status["message"]) == (
        rds.version_info,
        "weights rejected for test",
    )
    edit(plane, TWO_VERSIONS.replace("90, v2: 10", "40, v2: 60"))
    fixed = await client.recv()
    assert fixed.type_url == ROUTE and fixed.version_info not in (
        rds.version_info,
        last[ROUTE].version_info,
    )
    await client.ack(fixed, ROUTE_NAMES)
    await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["nack"] is None)


async def test_restarted_control_plane_never_repeats_versions(plane, tmp_path):
    other = ControlPlane(plane.config_path, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await other.start()
    try:
        mine, theirs = plane.cache.snapshot, other.cache.snapshot
        assert mine.version != theirs.version
        for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
            assert mine.types[type_url].version != theirs.types[type_url].version
            assert mine.types[type_url].resources == theirs.types[type_url].resources
    finally:
        await other.stop()


async def test_status_shows_a_disconnected_envoy_with_the_time_since(plane, capsys):
    client = await AdsClient(host_port(plane.xds_address), "gone-1").start()
    await converge(client)
    await client.close()
    node = await wait_for(lambda: [n for n in plane.status()["nodes"] if not n["connected"]])
    assert node[0]["node_id"] == "gone-1" and node[0]["disconnected_for"] >= 0
    admin = f"http://{host_port(plane.admin_address)}"
    assert await asyncio.to_thread(cli_main, ["status", "--admin-url", admin]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if " cds " in line]
    assert row.split()[:2] == ["gone-1", "no,"] and re.fullmatch(r"\d+s", row.split()[2])


async def test_a_bad_listen_in_node_metadata_refuses_the_stream_with_the_reason(plane):
    client = await AdsClient(host_port(plane.xds_address)).start()
    node = Node(id="bad-1")
    node.metadata.fields[LISTEN_METADATA].string_value = "localhost:8082"
    await client.requests.put(DiscoveryRequest(node=node, type_url=CLUSTER).SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client._reader  # the stream ends with the server's status
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node 'bad-1': metadata infergate.listen" in error.value.details()
    await client.close()


async def test_held_back_routes_go_out_when_the_warm_up_ends_without_a_request(plane, client):
    """The server's timer: routes held for a new cluster's first health check are sent
    when `wake_after` has passed, with no request or snapshot to trigger it."""
    checked = TWO_VERSIONS + "    resilience: {health_check: {timeout: 200ms}}\n"
    await converge(client)
    edit(plane, checked.replace("      v2:", "      v3: {endpoints: [127.0.0.1:9003]}\n      v2:"))
    cds = await client.recv()
    forced = await client.recv()  # EDS right behind CDS
    names = sorted(cluster_names(cds))
    await client.send(ENDPOINT, names, forced.version_info, forced.nonce)
    await client.ack(await client.recv(), names)
    await client.ack(cds)
    assert (await client.recv()).type_url == ROUTE


@pytest.fixture
async def one_initial_sync(tmp_path: Path, monkeypatch):
    """A control plane that gives one stream at a time its initial config."""
    monkeypatch.setattr("control_plane.xds_server.INITIAL_SYNCS", 1)
    config = tmp_path / "routing.yaml"
    config.write_text(TWO_VERSIONS)
    cp = ControlPlane(config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await cp.start()
    yield cp
    await cp.stop()


@pytest.mark.parametrize("first_leaves", [False, True])
async def test_initial_syncs_are_bounded_until_routes_are_acked_or_the_stream_ends(
    one_initial_sync, first_leaves
):
    address = host_port(one_initial_sync.xds_address)
    first = await AdsClient(address, "first").start()
    second = await AdsClient(address, "second").start()
    try:
        await first.send(CLUSTER)
        cds = await first.recv()
        await second.send(CLUSTER)
        with pytest.raises(TimeoutError):  # waits for the first stream's slot
            await second.recv(timeout=0.3)
        if first_leaves:
            await first.close()
        else:
            await finish_handshake(first, cds)  # ends with the routes ACKed
        assert cluster_names(await second.recv()) == {"iris/v1", "iris/v2"}
    finally:
        await second.close()
        if not first_leaves:
            await first.close()


async def test_a_burst_of_streams_opened_while_the_plane_is_busy_is_served(plane):
    """Envoys reconnecting at once (a restart): 1,500 streams that open while the control
    plane's event loop is busy all get served. gRPC's defaults cancel new streams past
    1,000 waiting to be accepted (55-58 of these)."""
    streams = 1_500
    client = subprocess.Popen(
        [sys.executable, "-m", "tests.burst_client", host_port(plane.xds_address), str(streams)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout and client.stdout.readline() == "failed 0\n"  # blocks the loop
        nodes = plane.registry.nodes
        await wait_for(lambda: sum(n.connected for n in nodes.values()) == streams, timeout=20)
    finally:
        assert client.stdin
        client.stdin.close()
        client.wait(10)
