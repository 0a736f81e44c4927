"""Operating the control plane: registration with a token, burst coalescing, several
Envoys (one late, SotW and Delta side by side), `infergate status`, and xDS over TLS."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import pytest
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from google.protobuf.any_pb2 import Any

from control_plane.service import ControlPlane
from control_plane.snapshot import ENDPOINT, ROUTE
from control_plane.translate import model_routes_name
from gateway import observe
from gateway.bootstrap import XdsTls
from gateway.processes import Child, free_port, host_port, infergate_command, wait_http
from tests.certs import CertificateAuthority
from tests.stack import ADMIN_TOKEN, LoadLoop, Stack, cli, count_versions
from tests.test_config import BASE as TWO_VERSIONS
from tests.test_xds_protocol import ROUTE_NAMES, converge, edit
from tests.xds_client import AdsClient

TOKEN = ADMIN_TOKEN


def pushed_ports(plane: ControlPlane, cluster: str) -> list[int]:
    """The endpoint ports of `cluster` in the snapshot the control plane pushes."""
    wrapped = Any.FromString(plane.cache.snapshot.types[ENDPOINT].resources[cluster])
    assignment = ClusterLoadAssignment()
    assert wrapped.Unpack(assignment)
    return sorted(
        lb.endpoint.address.socket_address.port_value
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    )


async def test_admin_writes_need_the_token_and_registration_changes_eds(plane):
    url = f"http://127.0.0.1:{plane.admin_address[1]}/endpoints"
    body = {"model": "iris", "version": "v1", "address": "127.0.0.1:9009"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert pushed_ports(plane, "iris/v1") == [9001]
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
        await _wait(lambda: pushed_ports(plane, "iris/v1") == [9001, 9009])
        assert pushed_ports(plane, "iris/v2") == [9002]
        async with http.delete(url, json=body, headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["changed"] is True
        await _wait(lambda: pushed_ports(plane, "iris/v1") == [9001])


async def test_writes_are_refused_without_a_configured_token(tmp_path):
    config = tmp_path / "routing.yaml"
    config.write_text(TWO_VERSIONS)
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
    """Ten saves that reach the control plane before it builds become one snapshot: the
    first snapshot built after them already holds the last save."""
    builds = plane.builds
    for port in range(9100, 9110):  # no await in between: the publisher cannot run
        edit(plane, TWO_VERSIONS.replace("9001", str(port)))
    await _wait(lambda: plane.builds > builds)
    assert plane.builds - builds == 1
    assert pushed_ports(plane, "iris/v1") == [9109]


async def test_status_gives_the_steps_of_the_last_reload_in_order(plane):
    """`config.timings` (read by bench.convergence): each step of a save's way to the
    snapshot, at or after the save and in order."""
    builds, saved = plane.builds, time.time()
    edit(plane, TWO_VERSIONS.replace("9001", "9120"))
    await _wait(lambda: plane.builds > builds)
    config = plane.status()["config"]
    steps = ["changed_at", "parsed_at", "build_started_at", "built_at"]
    times = [config["timings"][step] for step in steps] + [config["applied_at"]]
    assert saved <= times[0] and times == sorted(times)


async def test_a_failing_build_is_reported_and_the_next_edit_builds_again(plane, monkeypatch):
    """A bug in translation (injected here) must not stop the publisher silently."""
    from control_plane import service

    before = plane.cache.snapshot.version

    def broken(config):
        raise ValueError("a translator bug")

    monkeypatch.setattr(service, "translate", broken)
    edit(plane, TWO_VERSIONS.replace("9001", "9100"))
    await _wait(lambda: plane.status()["config"]["error"] is not None)
    assert plane.status()["config"]["error"]["message"] == (
        "building the snapshot failed (ValueError('a translator bug')); the last one keeps serving"
    )
    assert plane.cache.snapshot.version == before
    monkeypatch.undo()
    edit(plane, TWO_VERSIONS.replace("9001", "9101"))
    await _wait(lambda: pushed_ports(plane, "iris/v1") == [9101])
    assert plane.status()["config"]["error"] is None


async def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def infergate_status(*args: str) -> tuple[int, str, str]:
    """Run `infergate status ARGS` without blocking the event loop that serves the plane."""
    proc = await asyncio.create_subprocess_exec(
        *infergate_command("status", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_status_command_shows_acks_nacks_and_config_errors(plane):
    url = f"http://127.0.0.1:{plane.admin_address[1]}"
    client = await AdsClient(host_port(plane.xds_address), node_id="edge-1").start()
    try:
        last = await converge(client)
        code, out, _ = await infergate_status("--admin-url", url)
        assert code == 0
        rows = sorted(line.split() for line in out.splitlines() if line.startswith("edge-1 "))
        assert rows == [["edge-1", "yes", t, "yes"] for t in ("cds", "eds", "lds", "rds", "srds")]
        edit(plane, TWO_VERSIONS.replace("90, v2: 10", "50, v2: 50"))
        rds = await client.recv()
        await client.send(
            ROUTE, ROUTE_NAMES, last[ROUTE].version_info, rds.nonce, error="bad weights"
        )
        await _wait(lambda: plane.status()["nodes"][0]["types"]["rds"]["nack"] is not None)
        plane.config_path.write_text(TWO_VERSIONS.replace("v1: 90", "v1: -5"))
        plane.watcher.check()
        assert plane.status()["config"]["error"]

        code, out, _ = await infergate_status("--admin-url", url)
        assert code == 0
        assert "config error (last good config still serving):" in out
        assert "models.iris.traffic.v1: weight must be a non-negative integer" in out
        (rds_line,) = [line for line in out.splitlines() if " rds " in line]
        assert rds_line.split()[3] == "no" and rds_line.endswith("bad weights")

        code, out, _ = await infergate_status("--admin-url", url, "--json")
        status = json.loads(out)
        assert code == 0 and status["snapshot"] == plane.status()["snapshot"]
        assert status["nodes"][0]["types"]["rds"]["nack"]["message"] == "bad weights"
        assert "traffic.v1" in status["config"]["error"]["message"]
    finally:
        await client.close()
    code, out, err = await infergate_status("--admin-url", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and out == "" and "cannot reach the control plane" in err


def iris_routes_version(envoy_admin_url: str) -> str:
    """The version of the response that brought iris's route configuration."""
    configs = observe.route_configs(envoy_admin_url)
    (iris,) = [c for c in configs if c["route_config"]["name"] == model_routes_name("iris")]
    return iris["version_info"]


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
        stack.wait_healthy("iris/v1", f"127.0.0.1:{extra}")
        stack.serve_until_replica_answers(extra)
        started = time.time()
        _admin(stack, "DELETE", body)
        stack.wait_converged(after=started)
        assert set(observe.hosts(stack.envoy_url, "iris/v1")) == {f"127.0.0.1:{listed}"}
        before = stack.port_requests(extra)
        assert count_versions(stack.listen, 100) == {"v1": 100}
        assert stack.port_requests(extra) == before
    finally:
        stack.stop()


def _admin(stack: Stack, method: str, body: str) -> None:
    req = urllib.request.Request(
        f"{stack.control_plane_url}/endpoints",
        body.encode(),
        {"Authorization": f"Bearer {TOKEN}"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def admin_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


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
        stack.launch_envoy("edge-delta", second, delta=True, listen=free_port())
        wait_http(f"{admin_url(second)}/ready", timeout=30)
        stack.wait_converged(nodes=2)
        for traffic in ({"v2": 100}, {"v1": 50, "v3": 50}, {"v3": 100}):
            started = time.time()
            stack.route(traffic)
            stack.wait_converged(after=started, nodes=2)
            for admin in (stack.envoy_admin, second):
                split = observe.route(admin_url(admin), "iris/split")["route"]
                assert observe.weights(split, "iris/") == traffic
        late = free_port()
        stack.launch_envoy("edge-late", late, delta=False, listen=free_port())
        wait_http(f"{admin_url(late)}/ready", timeout=30)
        status = stack.wait_converged(nodes=3)
        rds = status["snapshot"]["types"]["rds"]
        # SotW Envoys report the version of the response that brought each route
        # configuration (iris's: the last edit's); a Delta Envoy has none per config.
        assert iris_routes_version(stack.envoy_url) == iris_routes_version(admin_url(late))
        assert iris_routes_version(stack.envoy_url) == rds
        for admin in (stack.envoy_admin, second, late):
            split = observe.route(admin_url(admin), "iris/split")["route"]
            assert observe.weights(split, "iris/") == {"v3": 100}
        assert sorted(n["node_id"] for n in status["nodes"]) == [
            "edge-delta",
            "edge-late",
            "edge-sotw",
        ]
        assert count_versions(stack.listen, 20) == {"v3": 20}
    finally:
        stack.stop()


def refused_tls_handshakes(envoy_admin: int) -> int:
    """xDS connections of an Envoy that the control plane closed during the TLS handshake."""
    url = admin_url(envoy_admin)
    return observe.envoy_stat(url, "cluster.xds_cluster.ssl.connection_error") + (
        observe.envoy_stat(url, "cluster.xds_cluster.upstream_cx_destroy_remote")
    )


def wait_refused(envoy_admin: int, timeout: float = 30.0) -> None:
    """Wait until the control plane has refused the Envoy's TLS connection twice."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if refused_tls_handshakes(envoy_admin) >= 2:
                return
        except OSError:  # its admin interface is not up yet (an Envoy that starts slowly)
            pass
        assert time.monotonic() < deadline, "the Envoy's xDS connection was never refused"
        time.sleep(0.1)


def test_xds_over_tls_server_only_then_mutual(tmp_path, model_repository, envoy_binary):
    """Server-only TLS serves any Envoy that trusts the CA; with `--tls-client-ca` only
    Envoys with a client certificate of that CA get config, over SotW and Delta."""
    ca = CertificateAuthority(tmp_path)
    server_cert, server_key = ca.issue("control-plane")
    client_cert, client_key = ca.issue("envoy")
    foreign = CertificateAuthority(tmp_path, "foreign CA")
    foreign_cert, foreign_key = foreign.issue("foreign-envoy")
    stack = Stack(tmp_path, model_repository, replicas={"v1": 1})
    server_tls = ("--tls-cert", str(server_cert), "--tls-key", str(server_key))
    trusted_tls = XdsTls(str(ca.path), str(client_cert), str(client_key))
    try:
        stack.start_models()
        stack.route({"v1": 100})
        stack.start_control_plane(*server_tls)
        plain = free_port()
        stack.launch_envoy("server-tls-only", plain, False, XdsTls(str(ca.path)))
        wait_http(f"{admin_url(plain)}/ready", timeout=30)
        stack.wait_converged()
        stack.control_plane.stop()
        for envoy in stack.envoys:
            envoy.stop()
        stack.envoys.clear()

        stack.start_control_plane(*server_tls, "--tls-client-ca", str(ca.path))
        trusted = {mode: free_port() for mode in ("sotw", "delta")}
        for mode, port in trusted.items():
            stack.launch_envoy(
                f"trusted-{mode}", port, mode == "delta", trusted_tls, listen=free_port()
            )
        anonymous, stranger = free_port(), free_port()
        stack.launch_envoy("anonymous", anonymous, False, XdsTls(str(ca.path)))
        foreign_tls = XdsTls(str(ca.path), str(foreign_cert), str(foreign_key))
        stack.launch_envoy("foreign", stranger, True, foreign_tls)
        for port in trusted.values():
            wait_http(f"{admin_url(port)}/ready", timeout=30)
        status = stack.wait_converged(nodes=2)
        wait_refused(anonymous)
        wait_refused(stranger)
        nodes = sorted(n["node_id"] for n in stack.status()["nodes"])
        assert nodes == ["trusted-delta", "trusted-sotw"]
        assert observe.route_configs(admin_url(anonymous)) == []
        assert observe.route_configs(admin_url(stranger)) == []
        assert iris_routes_version(admin_url(trusted["sotw"])) == status["snapshot"]["types"]["rds"]
        split = observe.route(admin_url(trusted["delta"]), "iris/split")["route"]
        assert observe.weights(split, "iris/") == {"v1": 100}
    finally:
        stack.stop()


def test_model_server_registers_itself_and_leaves_on_sigterm_without_failures(
    tmp_path, model_repository, envoy_binary
):
    """Over Delta xDS (the admin-API test above runs both modes)."""
    stack = Stack(tmp_path, model_repository, delta=True, replicas={"v1": 1})
    token = tmp_path / "token"
    token.write_text(TOKEN)
    extra = free_port()
    try:
        stack.start_all({"v1": 100}, "--admin-token-file", str(token))
        argv = cli(
            "serve",
            *("--repository", str(model_repository), "--model", "iris", "--version", "v1"),
            *("--port", str(extra), "--register-with", stack.control_plane_url),
            *("--admin-token-file", str(token)),
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
        stack.wait_healthy("iris/v1", f"127.0.0.1:{extra}")
        stack.serve_until_replica_answers(extra)
        with LoadLoop(stack.listen) as load:
            load.wait_results(50)
            assert server.stop(timeout=30) == 0  # deregisters, drains, exits
            assert stack.status()["registered_endpoints"] == []
            load.wait_results(100)
        assert f"127.0.0.1:{extra}" not in observe.hosts(stack.envoy_url, "iris/v1")
        assert load.failures() == []
        # It left the gateway first, then answered its last requests, then closed.
        said = (tmp_path / "extra.log").read_text()
        order = [
            said.index(f"deregistered 127.0.0.1:{extra}"),
            said.index("model_servers.server INFO stopped"),
        ]
        assert said.index("signal received: draining") < order[0] < order[1], said[-1500:]
    finally:
        stack.stop()
