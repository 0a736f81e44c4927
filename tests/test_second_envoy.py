"""Two Envoys on one machine and one control plane: the second, bootstrapped with
`infergate bootstrap --listen`, serves the gateway on its own address (node metadata),
the first on the routing file's `listen`; in both xDS modes."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from control_plane.service import ControlPlane
from gateway.bootstrap import envoy_command
from gateway.processes import Child, free_port, infergate_command, wait_http
from tests.stack import get_json
from tests.test_config import BASE as TWO_VERSIONS


def start_envoy(workdir: Path, envoy_binary: str, node_id: str, xds: int, *options: str):
    """One Envoy from the bootstrap that `infergate bootstrap` prints; (child, admin port)."""
    admin = free_port()
    bootstrap = subprocess.run(
        infergate_command(
            "bootstrap",
            "--node-id",
            node_id,
            "--xds",
            f"127.0.0.1:{xds}",
            "--envoy-admin",
            f"127.0.0.1:{admin}",
            *options,
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = workdir / f"envoy-{node_id}.json"
    path.write_text(bootstrap)
    argv = envoy_command(envoy_binary, str(path))
    return Child(f"envoy {node_id}", argv, str(workdir / f"envoy-{node_id}.log")).start(), admin


def gateway_port(admin: int) -> int:
    """The port of the `gateway` listener that this Envoy runs."""
    listeners = get_json(f"http://127.0.0.1:{admin}/listeners?format=json")
    (gateway,) = [s for s in listeners["listener_statuses"] if s["name"] == "gateway"]
    return gateway["local_address"]["socket_address"]["port_value"]


@pytest.mark.parametrize("mode", ["sotw", "delta"])
async def test_a_second_envoy_serves_on_its_own_listen_address(tmp_path, envoy_binary, mode):
    listen, own = free_port(), free_port()
    config = tmp_path / "routing.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{listen}\n" + TWO_VERSIONS + "    resilience: {health_check: false}\n"
    )
    plane = ControlPlane(config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await plane.start()
    delta = ["--delta"] if mode == "delta" else []
    envoys = []
    try:
        xds = plane.xds_address[1]
        envoys.append(start_envoy(tmp_path, envoy_binary, "first", xds, *delta))
        envoys.append(
            start_envoy(
                tmp_path, envoy_binary, "second", xds, *delta, "--listen", f"127.0.0.1:{own}"
            )
        )
        for child, admin in envoys:
            try:
                await asyncio.to_thread(wait_http, f"http://127.0.0.1:{admin}/ready", 60, child)
            except (RuntimeError, TimeoutError) as exc:  # say why (an abort was seen once)
                raise AssertionError(f"{exc}: {Path(child.log_path).read_text()[-3000:]}") from exc
        (_, first), (_, second) = envoys
        assert await asyncio.to_thread(gateway_port, first) == listen
        assert await asyncio.to_thread(gateway_port, second) == own
        for port in (listen, own):  # routes over RDS, answered by each Envoy
            ready = await asyncio.to_thread(get_json, f"http://127.0.0.1:{port}/v2/health/ready")
            assert ready == {"ready": True}
        nodes = {n["node_id"]: n for n in plane.status()["nodes"]}
        assert (nodes["first"]["listen"], nodes["second"]["listen"]) == (None, f"127.0.0.1:{own}")
        assert {n["mode"] for n in nodes.values()} == {mode}
    finally:
        for child, _ in envoys:
            await asyncio.to_thread(child.stop)
        await plane.stop()
