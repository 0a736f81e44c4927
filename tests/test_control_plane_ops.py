"""Operating the control plane: registration with a token, burst coalescing, several
Envoys (one late, SotW and Delta side by side), `infergate status`, and mutual TLS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from control_plane.service import ControlPlane
from control_plane.snapshot import ENDPOINT
from gateway.bootstrap import XdsTls
from gateway.processes import Child, free_port, wait_http
from tests.certs import CertificateAuthority
from tests.stack import LoadLoop, Stack, cli, count_versions, get_json, get_text

TOKEN = "s3cret-token"
ONE = "models:\n  iris:\n    versions:\n      v1: {endpoints: [127.0.0.1:9001]}\n"


@pytest.fixture
async def plane(tmp_path):
    config = tmp_path / "routing.yaml"
    config.write_text(ONE)
    cp = ControlPlane(
        config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()), admin_token=TOKEN
    )
    await cp.start()
    yield cp
    await cp.stop()


async def test_admin_writes_need_the_token_and_registration_changes_eds(plane):
    url = f"http://127.0.0.1:{plane.admin_address[1]}/endpoints"
    body = {"model": "iris", "version": "v1", "address": "127.0.0.1:9009"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = plane.cache.snapshot.types[ENDPOINT].version
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body) as resp:
            assert resp.status == 401 and "token" in (await resp.json())["error"]
        async with http.post(url, json=body, headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        async with http.post(url, json={**body, "version": "v7"}, headers=auth) as resp:
            assert resp.status == 404 and "v7" in (await resp.json())["error"]
        async with http.post(url, json={**body, "address": "localhost:1"}, headers=auth) as r:
            assert r.status == 400 and "ip:port" in (await r.json())["error"]
        async with http.post(url, json=body, headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["changed"] is True
        async with http.get(url) as resp:
            assert (await resp.json())["endpoints"] == [body]
        await _wait(lambda: plane.cache.snapshot.types[ENDPOINT].version != before)
        blob = plane.cache.snapshot.types[ENDPOINT].resources["iris/v1"]
        assert b"127.0.0.1" in blob and (9009).to_bytes(2, "little") not in b""  # sanity
        async with http.delete(url, json=body, headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["changed"] is True
        await _wait(lambda: plane.cache.snapshot.types[ENDPOINT].version == before)


async def test_writes_are_refused_without_a_configured_token(tmp_path):
    config = tmp_path / "routing.yaml"
    config.write_text(ONE)
    cp = ControlPlane(config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    await cp.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{cp.admin_address[1]}/endpoints", json={}
            ) as resp:
                assert resp.status == 403 and "token" in (await resp.json())["error"]
    finally:
        await cp.stop()


async def test_a_burst_of_edits_coalesces_into_one_push(plane):
    """Edits seen before the build starts (here: without yielding to the event loop) make
    one build, and the last one wins."""
    builds = plane.builds
    for port in range(9100, 9110):
        plane.config_path.write_text(ONE.replace("9001", str(port)))
        plane.watcher.check()
    await _wait(lambda: plane.builds > builds)
    await _sleep(0.2)
    assert plane.builds - builds == 1
    assert b"127.0.0.1" in plane.cache.snapshot.types[ENDPOINT].resources["iris/v1"]
    assert plane.endpoints.merge(plane.file_config).models[0].versions[0].endpoints[0].port == 9109


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _wait(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await _sleep(0.01)


def port_requests(port: int) -> float:
    text = get_text(f"http://127.0.0.1:{port}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("infergate_model_requests_total{")
    )


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_registered_replica_gets_traffic_and_deregistered_gets_none(
    tmp_path, model_repository, envoy_binary, mode
):
    stack = Stack(tmp_path, model_repository, delta=mode == "delta", replicas={"v1": 2})
    listed, extra = stack.model_ports["v1"]
    try:
        stack.start_models()
        stack.write(
            f"listen: 127.0.0.1:{stack.listen}\nmodels:\n  iris:\n    versions:\n"
            f"      v1: {{endpoints: [127.0.0.1:{listed}]}}\n"
        )
        (tmp_path / "token").write_text(TOKEN)
        stack.start_control_plane("--admin-token-file", str(tmp_path / "token"))
        stack.start_envoy()
        stack.wait_converged()
        body = json.dumps({"model": "iris", "version": "v1", "address": f"127.0.0.1:{extra}"})
        started = time.time()
        _admin(stack, "POST", body)
        stack.wait_converged(after=started)
        time.sleep(1.5)  # the new endpoint passes its first health check
        before = port_requests(extra)
        count_versions(stack.listen, 200)
        assert port_requests(extra) - before > 20
        started = time.time()
        _admin(stack, "DELETE", body)
        stack.wait_converged(after=started)
        before = port_requests(extra)
        count_versions(stack.listen, 100)
        assert port_requests(extra) == before
    finally:
        stack.stop()


def _admin(stack: Stack, method: str, body: str) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.admin}/endpoints",
        body.encode(),
        {"Authorization": f"Bearer {TOKEN}"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def route_version(envoy_admin: int) -> str | None:
    """The version of the route configuration an Envoy applied; None if it has none."""
    try:
        dump = get_json(
            f"http://127.0.0.1:{envoy_admin}/config_dump?resource=dynamic_route_configs"
        )
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # Envoy has no resource of that kind at all
            return None
        raise
    configs = dump.get("configs", [])
    return configs[0].get("version_info") if configs else None


def split_route(envoy_admin: int) -> dict:
    """The weighted-split route action that an Envoy applied."""
    dump = get_json(f"http://127.0.0.1:{envoy_admin}/config_dump?resource=dynamic_route_configs")
    routes = dump["configs"][0]["route_config"]["virtual_hosts"][0]["routes"]
    return next(r["route"] for r in routes if r["name"] == "iris/split")


def test_several_envoys_sotw_and_delta_and_a_late_one_converge(
    tmp_path, model_repository, envoy_binary
):
    stack = Stack(tmp_path, model_repository)
    try:
        stack.start_models()
        stack.route({"v1": 100})
        stack.start_control_plane()
        stack.start_envoy("edge-sotw")
        second = free_port()
        stack.launch_envoy("edge-delta", second, delta=True)
        wait_http(f"http://127.0.0.1:{second}/ready", timeout=30)
        stack.wait_converged(nodes=2)
        for traffic in ({"v2": 100}, {"v1": 50, "v3": 50}, {"v3": 100}):
            started = time.time()
            stack.route(traffic)
            stack.wait_converged(after=started, nodes=2)
        late = free_port()
        stack.launch_envoy("edge-late", late, delta=False)
        wait_http(f"http://127.0.0.1:{late}/ready", timeout=30)
        status = stack.wait_converged(nodes=3)
        rds = status["snapshot"]["types"]["rds"]
        assert route_version(stack.envoy_admin) == route_version(late) == rds  # SotW
        for admin in (stack.envoy_admin, second, late):
            assert split_route(admin)["cluster"] == "iris/v3"
        assert sorted(n["node_id"] for n in status["nodes"]) == [
            "edge-delta",
            "edge-late",
            "edge-sotw",
        ]
        assert count_versions(stack.listen, 20) == {"v3": 20}
        table = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "status",
                "--admin-url",
                f"http://127.0.0.1:{stack.admin}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for node in ("edge-delta", "edge-late", "edge-sotw"):
            assert f"{node}" in table.stdout
        assert " no " not in table.stdout  # every type ACKed at the current version
    finally:
        stack.stop()


def test_mutual_tls_envoy_without_client_cert_gets_no_config(
    tmp_path, model_repository, envoy_binary
):
    ca = CertificateAuthority(tmp_path)
    server_cert, server_key = ca.issue("control-plane")
    client_cert, client_key = ca.issue("envoy")
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    try:
        stack.start_models()
        stack.route({"v1": 100})
        stack.start_control_plane(
            "--tls-cert",
            str(server_cert),
            "--tls-key",
            str(server_key),
            "--tls-client-ca",
            str(ca.path),
        )
        trusted = free_port()
        stack.launch_envoy(
            "trusted", trusted, False, XdsTls(str(ca.path), str(client_cert), str(client_key))
        )
        anonymous = free_port()
        stack.launch_envoy("anonymous", anonymous, False, XdsTls(str(ca.path)))
        wait_http(f"http://127.0.0.1:{trusted}/ready", timeout=30)
        stack.wait_converged()
        time.sleep(2.0)
        nodes = [n["node_id"] for n in stack.status()["nodes"]]
        assert nodes == ["trusted"]
        assert route_version(anonymous) is None
        assert route_version(trusted) == stack.status()["snapshot"]["types"]["rds"]
    finally:
        stack.stop()


def test_model_server_registers_itself_and_leaves_on_sigterm_without_failures(
    tmp_path, model_repository, envoy_binary
):
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    (listed,) = stack.model_ports["v1"]
    token = tmp_path / "token"
    token.write_text(TOKEN)
    extra = free_port()
    try:
        stack.start_all({"v1": 100}, "--admin-token-file", str(token))
        argv = cli(
            "serve",
            "--repository",
            str(model_repository),
            "--model",
            "iris",
            "--version",
            "v1",
            "--port",
            str(extra),
            "--register-with",
            f"http://127.0.0.1:{stack.admin}",
            "--admin-token-file",
            str(token),
        )
        server = Child("self-registering model", argv, str(tmp_path / "extra.log")).start()
        stack.envoys.append(server)  # stopped with the stack if the test fails early
        deadline = time.monotonic() + 20
        while not stack.status()["registered_endpoints"]:
            assert time.monotonic() < deadline, "the server did not register"
            time.sleep(0.1)
        assert stack.status()["registered_endpoints"] == [
            {"model": "iris", "version": "v1", "address": f"127.0.0.1:{extra}"}
        ]
        stack.wait_converged()
        time.sleep(1.5)  # first health check
        before = port_requests(extra)
        count_versions(stack.listen, 200)
        assert port_requests(extra) > before
        with LoadLoop(stack.listen) as load:
            time.sleep(0.5)
            assert server.stop() == 0
            time.sleep(1.0)
        assert stack.status()["registered_endpoints"] == []
        assert load.failures() == [] and len(load.results) > 100
    finally:
        stack.stop()
