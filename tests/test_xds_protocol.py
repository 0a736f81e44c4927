"""The ADS state machine over real gRPC, driven by a client that behaves like Envoy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster

from control_plane.service import ControlPlane
from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE
from control_plane.translate import ROUTE_CONFIG_NAME
from gateway.processes import free_port, host_port
from tests.test_config import BASE as TWO_VERSIONS
from tests.xds_client import AdsClient


def cluster_names(resp) -> set[str]:
    return {Cluster.FromString(r.value).name for r in resp.resources}


@pytest.fixture
async def plane(tmp_path: Path):
    config = tmp_path / "routing.yaml"
    config.write_text(TWO_VERSIONS)
    cp = ControlPlane(config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await cp.start()
    yield cp
    await cp.stop()


@pytest.fixture
async def client(plane):
    c = await AdsClient(host_port(plane.xds_address)).start()
    yield c
    await c.close()


async def converge(c: AdsClient) -> dict:
    """Walk the initial handshake the way Envoy does; return the last response per type."""
    last = {}
    await c.send(CLUSTER)
    last[CLUSTER] = cds = await c.recv()
    names = sorted(cluster_names(cds))
    await c.send(ENDPOINT, names)
    last[ENDPOINT] = eds = await c.recv()
    await c.ack(eds, names)
    await c.ack(cds)  # Envoy ACKs clusters once they are warm
    await c.send(LISTENER)
    last[LISTENER] = lds = await c.recv()
    await c.ack(lds)
    await c.send(ROUTE, [ROUTE_CONFIG_NAME])
    last[ROUTE] = rds = await c.recv()
    await c.ack(rds, [ROUTE_CONFIG_NAME])
    assert await c.no_response(0.3)
    return last


def edit(plane: ControlPlane, text: str) -> None:
    plane.config_path.write_text(text)
    plane.watcher.check()


async def test_handshake_serves_every_type_with_epoch_versions(plane, client):
    last = await converge(client)
    assert cluster_names(last[CLUSTER]) == {"iris/v1", "iris/v2"}
    assert len(last[ENDPOINT].resources) == 2
    for resp in last.values():
        assert resp.version_info.startswith(plane.epoch + "-")
    node = plane.status()["nodes"][0]
    assert node["node_id"] == "sim-1" and node["connected"]
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
        [ROUTE_CONFIG_NAME],
        last[ROUTE].version_info,
        rds.nonce,
        error="weights rejected for test",
    )
    assert await client.no_response(0.8)
    rds_status = plane.status()["nodes"][0]["types"]["rds"]
    assert rds_status["nack"] == {
        "version": rds.version_info,
        "message": "weights rejected for test",
    }
    assert rds_status["acked_version"] == last[ROUTE].version_info
    edit(plane, TWO_VERSIONS.replace("90, v2: 10", "40, v2: 60"))
    fixed = await client.recv()
    assert fixed.type_url == ROUTE and fixed.version_info not in (
        rds.version_info,
        last[ROUTE].version_info,
    )
    await client.ack(fixed, [ROUTE_CONFIG_NAME])
    assert await client.no_response(0.3)
    assert plane.status()["nodes"][0]["types"]["rds"]["nack"] is None


async def test_stale_nonce_is_ignored(plane, client):
    last = await converge(client)
    # A request answering an old nonce, asking for other names, must change nothing.
    await client.send(ENDPOINT, ["iris/v1"], "", last[CLUSTER].nonce)
    assert await client.no_response(0.5)
    await client.send(ENDPOINT, ["iris/v1"], last[ENDPOINT].version_info, last[ENDPOINT].nonce)
    eds = await client.recv()
    assert eds.type_url == ENDPOINT and len(eds.resources) == 1


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


async def test_endpoint_change_pushes_eds_alone(plane, client):
    await converge(client)
    edit(plane, TWO_VERSIONS.replace("9002", "9012"))
    eds = await client.recv()
    assert eds.type_url == ENDPOINT
    await client.ack(eds, ["iris/v1", "iris/v2"])
    assert await client.no_response(0.5)


async def test_eds_is_resent_after_cds_change_even_with_same_names(plane, client):
    await converge(client)
    # A changed cluster re-warms in Envoy: endpoints follow CDS even for unchanged names.
    edit(plane, TWO_VERSIONS + "    resilience: {load_balancing: random}\n")
    cds = await client.recv()
    assert cds.type_url == CLUSTER and cluster_names(cds) == {"iris/v1", "iris/v2"}
    eds = await client.recv()
    assert eds.type_url == ENDPOINT and len(eds.resources) == 2


async def test_removed_cluster_stays_until_routes_stop_naming_it(plane, client):
    last = await converge(client)
    edit(
        plane,
        TWO_VERSIONS.replace("      v2: {endpoints: [127.0.0.1:9002]}\n", "").replace(
            "{v1: 90, v2: 10}", "{v1: 100}"
        ),
    )
    # Routes go first; clusters they named stay until Envoy ACKs the new routes.
    rds = await client.recv()
    assert rds.type_url == ROUTE
    assert await client.no_response(0.3)
    await client.ack(rds, [ROUTE_CONFIG_NAME])
    cds = await client.recv()
    assert cds.type_url == CLUSTER and cluster_names(cds) == {"iris/v1"}
    assert cds.version_info != last[CLUSTER].version_info


async def test_new_cluster_is_warm_before_routes_name_it(plane, client):
    last = await converge(client)
    edit(
        plane,
        TWO_VERSIONS.replace(
            "      v2:", "      v3: {endpoints: [127.0.0.1:9003]}\n      v2:"
        ).replace("v2: 10}", "v2: 5, v3: 5}"),
    )
    cds = await client.recv()
    assert cds.type_url == CLUSTER and "iris/v3" in cluster_names(cds)
    forced = await client.recv()  # EDS right behind CDS, without waiting for its ACK
    assert forced.type_url == ENDPOINT
    names = sorted(cluster_names(cds))
    # Envoy asks for the new cluster's endpoints (answering the older EDS nonce: stale),
    # then ACKs the forced EDS with its new subscription.
    await client.send(ENDPOINT, names, last[ENDPOINT].version_info, last[ENDPOINT].nonce)
    await client.send(ENDPOINT, names, forced.version_info, forced.nonce)
    eds = await client.recv()
    assert eds.type_url == ENDPOINT and len(eds.resources) == 3
    await client.ack(eds, names)
    assert await client.no_response(0.3)  # routes wait: clusters are not ACKed yet
    await client.ack(cds)
    acked = time.monotonic()
    rds = await client.recv()
    assert rds.type_url == ROUTE
    # ...and then for the new cluster's first health check (timeout 1s) to finish.
    assert time.monotonic() - acked >= 0.7


async def test_weight_change_pushes_rds_alone(plane, client):
    await converge(client)
    edit(plane, TWO_VERSIONS.replace("90, v2: 10", "70, v2: 30"))
    rds = await client.recv()
    assert rds.type_url == ROUTE
    await client.ack(rds, [ROUTE_CONFIG_NAME])
    assert await client.no_response(0.5)


async def test_without_health_checks_routes_follow_the_acks_at_once(plane, client):
    no_checks = TWO_VERSIONS + "    resilience: {health_check: false}\n"
    built = plane.builds
    edit(plane, no_checks)
    while plane.builds == built:
        await asyncio.sleep(0.01)
    await converge(client)
    edit(
        plane,
        no_checks.replace(
            "      v2:", "      v3: {endpoints: [127.0.0.1:9003]}\n      v2:"
        ).replace("v2: 10}", "v2: 5, v3: 5}"),
    )
    cds = await client.recv()
    forced = await client.recv()
    names = sorted(cluster_names(cds))
    await client.send(ENDPOINT, names, forced.version_info, forced.nonce)
    eds = await client.recv()
    await client.ack(eds, names)
    await client.ack(cds)
    acked = time.monotonic()
    assert (await client.recv()).type_url == ROUTE
    assert time.monotonic() - acked < 0.5
