"""The whole stack in containers (the `infergate` image, host networking on 127.0.0.1).

Skips without a Docker engine or the image (`bash .ci/docker.sh start` enables it); fails
instead when CI=true. The tests share one stack and run in file order: the last one kills
a model server.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.testing import GatewayStack, gateway_stack
from tests.stack import LoadLoop, binomial_p_value, count_versions, routing_yaml

# Ports are placeholders: gateway_stack puts every address on a free port of 127.0.0.1.
# v1 has two replicas (two model-server containers), v2 one.
ROUTING = routing_yaml(8080, {"v1": [9001, 9011], "v2": [9002]}, {"v1": 70, "v2": 30})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, model_repository: Path):
    routing = tmp_path_factory.mktemp("containers") / "routing.yaml"
    routing.write_text(ROUTING)
    with gateway_stack(routing, model_repository) as gw:
        yield gw


def assert_split(gw: GatewayStack, n: int, share_v1: float) -> None:
    """The split is `share_v1` (the tests tell 70 % from 20 % and 0 %). At p > 1e-3 a right
    split failed once in CI (152 of 1,000 at 20 %, p = 1e-4); at 1e-6 a weight 7 points
    off still fails (270 of 1,000: p = 1e-7)."""
    counts = count_versions(gw.port, n)
    assert set(counts) <= {"v1", "v2"}, counts
    p = binomial_p_value(counts["v1"], n, share_v1)
    assert p > 1e-6, f"{counts} is unlikely for a {share_v1:.0%} share of v1 (p={p:.2g})"


def test_weighted_split_from_the_mounted_yaml(gateway: GatewayStack):
    assert gateway.applied_traffic() == {"v1": 70, "v2": 30}
    assert_split(gateway, 1000, 0.7)


def test_changing_the_mounted_yaml_changes_the_split(gateway: GatewayStack):
    gateway.set_traffic({"v1": 20, "v2": 80})
    assert gateway.applied_traffic() == {"v1": 20, "v2": 80}
    assert_split(gateway, 1000, 0.2)

    gateway.set_traffic({"v1": 0, "v2": 100})
    assert gateway.applied_traffic() == {"v2": 100}
    assert count_versions(gateway.port, 200) == {"v2": 200}


def test_control_plane_restart_does_not_interrupt_traffic(gateway: GatewayStack):
    gateway.set_traffic({"v1": 50, "v2": 50})
    with LoadLoop(gateway.port, threads=2) as load:
        load.wait_results(100)
        gateway.restart_control_plane()
        load.wait_results(100)
    assert len(load.results) > 200, "too little traffic to judge"
    assert load.failures() == []
    # The new control plane drives Envoy: a change still arrives.
    gateway.set_traffic({"v1": 100, "v2": 0})
    assert count_versions(gateway.port, 200) == {"v1": 200}


def test_killed_model_server_is_ejected_with_few_failures(gateway: GatewayStack):
    gateway.set_traffic({"v1": 100, "v2": 0})
    victim, survivor = gateway.replicas("v1")
    ejections = "cluster.iris/v1.outlier_detection.ejections_enforced_total"
    before = gateway.envoy_stat(ejections)
    with LoadLoop(gateway.port, threads=4) as load:
        load.wait_results(200)
        victim.kill()
        killed_at = time.monotonic()
        deadline = killed_at + 30
        while f"127.0.0.1:{victim.port}" not in (ejected := gateway.ejected_hosts("v1")):
            assert time.monotonic() < deadline, "the killed model server was never ejected"
            time.sleep(0.05)
        load.wait_results(300)
    total, failures = len(load.results), load.failures()
    assert total > 500, "too little traffic to judge"
    assert len(failures) / total < 0.005, f"{len(failures)}/{total} failed: {failures[:5]}"
    assert f"127.0.0.1:{survivor.port}" not in ejected
    assert gateway.envoy_stat(ejections) > before
    assert load.versions_since(killed_at)["v1"] > 100, "the survivor kept serving"


def test_delta_xds_envoy_follows_the_yaml(tmp_path: Path, model_repository: Path):
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "models:\n  iris:\n    versions:\n"
        "      v1: {endpoints: [127.0.0.1:9001]}\n      v2: {endpoints: [127.0.0.1:9002]}\n"
        "    traffic: {v1: 100, v2: 0}\n"
    )
    with gateway_stack(routing, model_repository, delta=True) as gw:
        assert count_versions(gw.port, 50) == {"v1": 50}
        gw.set_traffic({"v1": 0, "v2": 100})
        assert gw.applied_traffic() == {"v2": 100}
        assert count_versions(gw.port, 50) == {"v2": 50}
