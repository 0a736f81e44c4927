"""Delta (incremental) ADS over real gRPC, decoded with envoy-data-plane: per-resource
versions, removals, subscriptions, initial_resource_versions and NACKs on the wire. The
rules are tested without a network in `test_streams.py`."""

from __future__ import annotations

import pytest

from control_plane.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, SCOPED_ROUTE
from gateway.processes import host_port
from tests.test_xds_protocol import ROUTE_NAMES, TWO_VERSIONS, edit, wait_for
from tests.xds_client import DeltaClient


@pytest.fixture
async def delta(plane):
    c = await DeltaClient(host_port(plane.xds_address)).start()
    yield c
    await c.close()


def names(resp) -> dict[str, str]:
    return {r.name: r.version for r in resp.resources}


async def converge(c: DeltaClient) -> dict:
    last = {}
    await c.delta(CLUSTER)
    last[CLUSTER] = cds = await c.recv()
    await c.delta(ENDPOINT, subscribe=sorted(names(cds)))
    last[ENDPOINT] = eds = await c.recv()
    await c.ack(eds)
    await c.ack(cds)
    await c.delta(LISTENER)
    last[LISTENER] = lds = await c.recv()
    await c.ack(lds)
    await c.delta(SCOPED_ROUTE)
    last[SCOPED_ROUTE] = srds = await c.recv()
    await c.ack(srds)
    await c.delta(ROUTE, subscribe=ROUTE_NAMES)
    last[ROUTE] = rds = await c.recv()
    await c.ack(rds)
    return last


async def test_delta_handshake_sends_each_resource_with_its_version(plane, delta):
    last = await converge(delta)
    assert set(names(last[CLUSTER])) == {"iris/v1", "iris/v2"}
    assert set(names(last[ENDPOINT])) == {"iris/v1", "iris/v2"}
    assert set(names(last[ROUTE])) == set(ROUTE_NAMES)
    for resp in last.values():
        assert all(v.startswith(plane.epoch + "-") for v in names(resp).values())
    await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["acked_version"])
    node = plane.status()["nodes"][0]
    assert node["mode"] == "delta" and len(node["types"]) == 5
    assert all(t["acked_version"] and t["nack"] is None for t in node["types"].values())


async def test_removed_version_goes_routes_first_then_removed_resources(plane, delta):
    await converge(delta)
    # The routes' ACK is in: the clusters they name linger (a build on the loop may
    # otherwise publish the edit before the control plane has read the ACK).
    await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["acked_version"])
    edit(
        plane,
        TWO_VERSIONS.replace("      v2: {endpoints: [127.0.0.1:9002]}\n", "").replace(
            "{v1: 90, v2: 10}", "{v1: 100}"
        ),
    )
    rds = await delta.recv()
    assert rds.type_url == ROUTE
    await delta.ack(rds)
    cds = await delta.recv()
    assert cds.type_url == CLUSTER and list(cds.removed_resources) == ["iris/v2"]
    assert not cds.resources


async def test_nack_is_recorded_and_stale_nonce_still_subscribes(plane, delta):
    last = await converge(delta)
    edit(plane, TWO_VERSIONS.replace("90, v2: 10", "50, v2: 50"))
    rds = await delta.recv()
    await delta.delta(ROUTE, nonce=rds.nonce, error="rejected for test")
    nack = await wait_for(lambda: plane.status()["nodes"][0]["types"]["rds"]["nack"])
    assert nack["message"] == "rejected for test"
    # A stale nonce is no ACK, but its unsubscribe/subscribe still applies.
    await delta.delta(ENDPOINT, unsubscribe=["iris/v2"], nonce=last[CLUSTER].nonce)
    await delta.delta(ENDPOINT, subscribe=["iris/v2"], nonce=last[CLUSTER].nonce)
    eds = await delta.recv()
    assert eds.type_url == ENDPOINT and set(names(eds)) == {"iris/v2"}


async def test_reconnect_with_another_instances_versions_gets_everything(plane, delta):
    last = await converge(delta)
    stale = await DeltaClient(host_port(plane.xds_address), "sim-3").start()
    try:  # versions from another control-plane instance never look current
        await stale.delta(CLUSTER, initial={n: "0-old" for n in names(last[CLUSTER])})
        assert set(names(await stale.recv())) == {"iris/v1", "iris/v2"}
    finally:
        await stale.close()
