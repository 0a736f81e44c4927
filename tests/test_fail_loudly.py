"""Failing loudly and clearly: addresses in use, a locked run folder, versions without a
healthy endpoint, errors and restarts in the terminal, crash-loop backoff, the admin
token of `run`, and the reason of a refused registration."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import psutil
import pytest
from aiohttp import web

from control_plane.config import ConfigError, parse
from control_plane.health import HealthMonitor, Target
from control_plane.ports import AddressInUse, ensure_free
from control_plane.service import ControlPlane
from gateway.processes import MAX_DELAY, STABLE_AFTER, Child, free_port, wait_http
from gateway.supervisor import (
    Restarter,
    StackAddresses,
    StartFailed,
    Supervisor,
    lock_run_folder,
)
from tests.stack import get_json

CLI = [sys.executable, "-m", "gateway.cli"]


def infergate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def listening():
    """A socket of this test process listening on a free port of 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def one_model(listen: int, port: int) -> str:
    return f"listen: 127.0.0.1:{listen}\nmodels:\n  iris:\n    versions:\n" + (
        f"      v1: {{endpoints: [127.0.0.1:{port}]}}\n"
    )


# --- 1. addresses in use, the run-folder lock --------------------------------------------
def test_address_in_use_names_the_holder(listening):
    with pytest.raises(AddressInUse) as caught:
        ensure_free(("127.0.0.1", listening), "gateway")
    message = str(caught.value)
    assert f"gateway address 127.0.0.1:{listening} is already in use by pid" in message
    assert f"pid {os.getpid()} (" in message


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    start = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200 and max(ports) < start
    with socket.socket() as s:  # still free: nothing else holds it
        s.bind(("127.0.0.1", ports[-1]))


def test_free_ports_keep_to_the_range_given_in_the_environment(monkeypatch):
    monkeypatch.setenv("INFERGATE_PORT_RANGE", "20000-22000")  # e.g. one test worker's share
    ports = {free_port() for _ in range(200)}
    assert len(ports) == 200 and min(ports) >= 20000 and max(ports) < 22000


def test_second_control_plane_on_the_same_xds_port_fails_clearly(tmp_path):
    config = tmp_path / "routing.yaml"
    config.write_text(one_model(free_port(), free_port()))
    xds = f"127.0.0.1:{free_port()}"
    admin = free_port()
    first = Child(
        "first", [*CLI, "control-plane", str(config), "--xds", xds, "--admin", f"127.0.0.1:{admin}"]
    ).start()
    try:
        wait_http(f"http://127.0.0.1:{admin}/healthz", child=first)
        for port in (int(xds.rsplit(":", 1)[1]), admin):  # neither server shares its port
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                with pytest.raises(OSError, match="Address already in use"):
                    sock.bind(("127.0.0.1", port))
        # Another admin port: only the xDS port is shared (grpcio would share it silently).
        second = infergate(
            "control-plane", str(config), "--xds", xds, "--admin", f"127.0.0.1:{free_port()}"
        )
        assert second.returncode == 1
        assert lines(second.stderr) == [
            f"infergate control-plane: xDS address {xds} is already in use by pid "
            f"{first.proc.pid} ({' '.join(first.argv)[:120]})"
        ]
        third = infergate(
            "control-plane", str(config), "--xds", f"127.0.0.1:{free_port()}",
            "--admin", f"127.0.0.1:{admin}",
        )  # fmt: skip
        assert third.returncode == 1
        assert lines(third.stderr)[0].startswith(
            f"infergate control-plane: admin address 127.0.0.1:{admin} is already in use by pid "
            f"{first.proc.pid}"
        )
    finally:
        first.stop()


def test_run_with_a_taken_address_fails_at_once_and_starts_nothing(tmp_path, listening):
    config = tmp_path / "routing.yaml"
    config.write_text(one_model(listening, free_port()))
    workdir = tmp_path / "run"
    result = infergate(
        "run", str(config), "--workdir", str(workdir), "--xds", f"127.0.0.1:{free_port()}",
        "--admin", f"127.0.0.1:{free_port()}", "--envoy-admin", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert result.returncode == 1
    assert lines(result.stderr) == [
        f"infergate run: gateway (listen) address 127.0.0.1:{listening} is already in use "
        f"by pid {os.getpid()} ({' '.join(psutil.Process().cmdline())[:120]})"
    ]
    assert not list(workdir.glob("model-*.log")) and not list(workdir.glob("envoy-*.json"))


def test_serve_on_a_taken_port_and_run_with_a_bad_file_fail_in_one_line(tmp_path, listening):
    result = infergate("serve", "--repository", str(tmp_path), "--port", str(listening))
    assert result.returncode == 1
    assert lines(result.stderr) == [
        f"infergate serve: model server address 127.0.0.1:{listening} is already in use "
        f"by pid {os.getpid()} ({' '.join(psutil.Process().cmdline())[:120]})"
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  iris:\n    versions: {v1: {endpoints: [127.0.0.1:1]}}\n  x: [\n")
    result = infergate("run", str(bad), "--workdir", str(tmp_path / "run"))
    assert result.returncode == 1 and lines(result.stderr)[0].startswith(f"{bad}:5:1: ")


def test_second_run_on_the_same_folder_fails_and_leaves_its_files_alone(tmp_path):
    workdir = tmp_path / "run"
    lock = lock_run_folder(workdir)  # the first `infergate run`, as far as the lock goes
    try:
        bootstrap = workdir / "envoy-infergate-local.json"
        bootstrap.write_text("the first stack's bootstrap")
        before = {p.name: p.read_bytes() for p in workdir.iterdir()}
        config = tmp_path / "routing.yaml"
        config.write_text(one_model(free_port(), free_port()))
        result = infergate("run", str(config), "--workdir", str(workdir))
        assert result.returncode == 1
        assert lines(result.stderr) == [
            f"infergate run: {workdir}/ is in use by another infergate run "
            f"(pid {os.getpid()}): stop that one, or give this one another "
            "--workdir and other ports"
        ]
        assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before
    finally:
        lock.close()


# --- 2. versions without a healthy endpoint ------------------------------------------------
TWO = """
models:
  iris:
    grpc_listen: 127.0.0.1:8081
    versions:
      v1: {endpoints: [127.0.0.1:9001, 127.0.0.1:9011], grpc_endpoints: [127.0.0.1:9101]}
      v4: {endpoints: [127.0.0.1:9004], grpc_endpoints: [127.0.0.1:9104]}
      v5: {endpoints: [127.0.0.1:9005], grpc_endpoints: [127.0.0.1:9105]}
    traffic: {v1: 50, v4: 50}
"""


async def test_health_state_machine_reports_versions_without_a_healthy_endpoint(caplog):
    down: set[int] = {9004, 9104, 9011}

    async def probe(target: Target) -> str | None:
        return "connection refused" if target.address.port in down else None

    monitor = HealthMonitor(probe, unhealthy_after=2)
    monitor.set_config(parse(TWO, "routing.yaml"))
    caplog.set_level(logging.INFO, "infergate.health")
    await monitor.check()
    versions = {v["version"]: v for v in monitor.versions()}
    assert versions["v1"]["http"] == {"healthy": 1, "unknown": 0, "total": 2}
    assert versions["v1"]["grpc"] == {"healthy": 1, "unknown": 0, "total": 1}
    assert versions["v4"]["http"] == {"healthy": 0, "unknown": 0, "total": 1}
    assert (versions["v4"]["role"], versions["v5"]["role"]) == ("weight 50", "pinned only")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "iris/v4 (weight 50) has no healthy HTTP endpoint (0 of 1): " in "\n".join(warnings)
    assert "iris/v1 http endpoint 127.0.0.1:9011 is unhealthy: connection refused" in warnings
    assert not any("iris/v1 (" in w for w in warnings)  # v1 still has a healthy endpoint
    assert any("iris/v4 (weight 50) has no healthy GRPC endpoint (0 of 1)" in w for w in warnings)

    caplog.clear()
    await monitor.check()  # nothing changed: nothing said again
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []

    down.clear()
    down.add(9001)  # one failed probe of a healthy endpoint is not enough
    await monitor.check()
    assert {v["version"]: v for v in monitor.versions()}["v1"]["http"]["healthy"] == 2
    await monitor.check()
    versions = {v["version"]: v for v in monitor.versions()}
    assert versions["v1"]["http"]["healthy"] == 1 and versions["v4"]["http"]["healthy"] == 1
    said = [r.getMessage() for r in caplog.records]
    assert "iris/v4 serves HTTP again (1 of 1 endpoints healthy)" in said
    assert "iris/v4 serves GRPC again (1 of 1 endpoints healthy)" in said
    assert "iris/v1 http endpoint 127.0.0.1:9001 is unhealthy: connection refused" in said

    # A new config keeps what is known of the endpoints it still has.
    monitor.set_config(parse(TWO.replace("9005", "9006"), "routing.yaml"))
    versions = {v["version"]: v for v in monitor.versions()}
    assert versions["v1"]["http"] == {"healthy": 1, "unknown": 0, "total": 2}
    assert versions["v5"]["http"] == {"healthy": 0, "unknown": 1, "total": 1}


async def test_status_shows_healthy_and_total_endpoints_per_version(tmp_path):
    ready = web.Application()
    ready.router.add_get("/v2/health/ready", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(ready)
    await runner.setup()
    up = free_port()
    await web.TCPSite(runner, "127.0.0.1", up).start()
    config = tmp_path / "routing.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{free_port()}\nmodels:\n  iris:\n    versions:\n"
        f"      v1: {{endpoints: [127.0.0.1:{up}]}}\n"
        f"      v4: {{endpoints: [127.0.0.1:{free_port()}]}}\n"
        "    traffic: {v1: 50, v4: 50}\n"
    )
    plane = ControlPlane(
        config, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()), health_interval=0.05
    )
    await plane.start()
    try:
        url = f"http://127.0.0.1:{plane.admin_address[1]}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(f"{url}/status") as resp:
                    versions = {v["version"]: v for v in (await resp.json())["versions"]}
                if versions["v4"]["http"]["unknown"] == versions["v1"]["http"]["unknown"] == 0:
                    break
                await asyncio.sleep(0.05)
        assert versions["v1"]["http"] == {"healthy": 1, "unknown": 0, "total": 1}
        assert versions["v4"]["http"] == {"healthy": 0, "unknown": 0, "total": 1}
        assert versions["v4"]["endpoints"][0]["reason"] == "connection refused"
        shown = await asyncio.to_thread(infergate, "status", "--admin-url", url)
        rows = {line.split()[0]: line.split() for line in lines(shown.stdout)}
        assert rows["iris/v1"][1:4] == ["weight", "50", "1/1"]
        assert rows["iris/v4"][1:] == ["weight", "50", "0/1", "no", "healthy", "HTTP", "endpoint"]
    finally:
        await plane.stop()
        await runner.cleanup()


# --- 3. and 4. terminal lines, restarts with their cause, backoff, start failures -------------
def test_terminal_gets_warnings_one_line_each_and_the_file_gets_everything(tmp_path):
    log_file = tmp_path / "cp.log"
    code = (
        "import logging; from gateway import logs\n"
        f"logs.configure('INFO', {str(log_file)!r}, 'control plane: ')\n"
        "log = logging.getLogger('infergate.test')\n"
        "log.info('applied config 1')\n"
        "log.warning('NACK from edge-1 for lds v2: error adding listener: %s', 'x ' * 400)\n"
        "log.error('invalid routing config, keeping the last good one:\\n"
        "r.yaml:9:27: a\\nr.yaml:10:3: b')\n"
        "log.info('iris/v4 serves HTTP again', extra={'terminal': True})\n"
        "raise SystemError('boom')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    shown = lines(result.stderr)
    assert shown[0].startswith("control plane: NACK from edge-1 for lds v2: error adding listener")
    assert len(shown[0]) <= len("control plane: ") + 300
    assert shown[1:] == [
        "control plane: invalid routing config, keeping the last good one:",
        "control plane: r.yaml:9:27: a",
        "control plane: r.yaml:10:3: b",
        "control plane: iris/v4 serves HTTP again",
        "control plane: stopped by an error SystemError: boom",
    ]
    text = log_file.read_text()
    assert "applied config 1" in text and "Traceback" in text and "r.yaml:10:3: b" in text


def test_restarts_back_off_exponentially_and_say_why(tmp_path, caplog):
    log_path = tmp_path / "child.log"
    child = Child(
        "model iris/v1",
        [sys.executable, "-c", "print('loading iris/v1: model.joblib is corrupt'); exit(3)"],
        str(log_path),
    )
    restarter = Restarter([child])
    caplog.set_level(logging.WARNING, "infergate.supervisor")
    now = 100.0
    child.start()
    restarter.started(child, now)
    delays = []
    for _ in range(7):
        child.proc.wait()
        now += 0.5  # it fails soon after each start
        restarter.check(now)
        delays.append(restarter.state[child.name].restart_at - now)
        restarter.check(now + delays[-1] - 0.01)  # not yet
        assert not child.running and child.proc.returncode == 3
        now += delays[-1]
        restarter.check(now)  # restarts it
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY]
    said = caplog.records[-1].getMessage()
    assert said.startswith("model iris/v1 exited with code 3 after 0.5 s, 7 times in a row;")
    assert "restarting in 30 s. Its log ends: loading iris/v1: model.joblib is corrupt" in said
    # After a long run, an exit starts a new series.
    child.proc.wait()
    restarter.check(now + STABLE_AFTER + 1)
    assert restarter.state[child.name].restart_at == now + STABLE_AFTER + 1 + 1
    child.stop()


def test_run_fails_when_envoy_cannot_start(tmp_path):
    config = tmp_path / "routing.yaml"
    config.write_text(one_model(free_port(), free_port()))
    addresses = StackAddresses(*(("127.0.0.1", free_port()) for _ in range(3)))
    empty = tmp_path / "models"  # no iris/v1 in it: no model server to start
    empty.mkdir()
    supervisor = Supervisor(config, empty, tmp_path / "run", addresses)
    supervisor.envoy = Child(
        "envoy infergate-local",
        [sys.executable, "-c", "print('cannot bind 127.0.0.1:8080'); exit(1)"],
        str(tmp_path / "run" / "envoy.log"),
    )
    try:
        with pytest.raises(StartFailed) as caught:
            supervisor.start()
    finally:
        supervisor.stop()
    assert str(caught.value) == (
        "envoy infergate-local exited with code 1. Its log ends: cannot bind 127.0.0.1:8080"
    )


def test_edits_that_need_a_model_server_restart_say_so(tmp_path, caplog):
    config = tmp_path / "routing.yaml"
    http, v4 = free_port(), free_port()
    config.write_text(one_model(free_port(), http))
    (tmp_path / "models" / "iris" / "v1").mkdir(parents=True)
    addresses = StackAddresses(*(("127.0.0.1", free_port()) for _ in range(3)))
    supervisor = Supervisor(config, tmp_path / "models", tmp_path / "run", addresses)
    caplog.set_level(logging.WARNING, "infergate.supervisor")
    try:
        supervisor.follow_file()
        assert caplog.records == []  # the file it started with
        grpc, grpc4 = free_port(), free_port()
        config.write_text(
            f"listen: 127.0.0.1:{free_port()}\nmodels:\n  iris:\n"
            f"    grpc_listen: 127.0.0.1:{free_port()}\n    versions:\n"
            f"      v1: {{endpoints: [127.0.0.1:{http}], grpc_endpoints: [127.0.0.1:{grpc}]}}\n"
            f"      v4: {{endpoints: [127.0.0.1:{v4}], grpc_endpoints: [127.0.0.1:{grpc4}]}}\n"
            "    traffic: {v1: 50, v4: 50}\n"
        )
        supervisor.follow_file()
        supervisor.follow_file()  # said once only
    finally:
        supervisor.stop()
    restart = "infergate run starts model servers only when it starts, so start it yourself or "
    assert [r.getMessage() for r in caplog.records] == [
        f"iris/v1 at 127.0.0.1:{http} runs, but {config} now wants iris/v1 at "
        f"127.0.0.1:{http} (gRPC port {grpc}): {restart}restart infergate run",
        f"iris/v4 at 127.0.0.1:{v4} (gRPC port {grpc4}) is in {config} but was not started "
        "by infergate run: "
        f"{restart}restart infergate run",
    ]


# --- 5. admin token, refused registration ------------------------------------------------
@pytest.mark.parametrize("command", ["run", "control-plane"])
def test_a_missing_token_file_is_one_line(tmp_path, command):
    config = tmp_path / "routing.yaml"
    config.write_text(one_model(free_port(), free_port()))
    result = infergate(command, str(config), "--admin-token-file", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert lines(result.stderr) == [
        f"infergate {command}: cannot read --admin-token-file: [Errno 2] No such file or "
        f"directory: '{tmp_path / 'nope'}'"
    ]


def plane_and_registering_server(tmp_path, model_repository, *plane_options: str):
    """(control plane child, not started; model server child started with --register-with
    that plane's admin API; admin port; server port; server log path)."""
    config = tmp_path / "routing.yaml"
    config.write_text(one_model(free_port(), free_port()))
    admin, port = free_port(), free_port()
    plane = Child(
        "control plane",
        [*CLI, "control-plane", str(config), "--xds", f"127.0.0.1:{free_port()}",
         "--admin", f"127.0.0.1:{admin}", *plane_options],
    )  # fmt: skip
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    log_path = tmp_path / "serve.log"
    server = Child(
        "model server",
        [*CLI, "serve", "--repository", str(model_repository), "--model", "iris",
         "--version", "v1", "--port", str(port),
         "--register-with", f"http://127.0.0.1:{admin}", "--admin-token-file", str(token)],
        str(log_path),
    )  # fmt: skip
    return plane, server, admin, port, log_path


def wait_for_line(log_path, words: str, child: Child) -> str:
    """The first line of the log that contains `words`, waiting up to 60 s."""
    deadline = time.monotonic() + 60
    while not (lines := [s for s in log_path.read_text().splitlines() if words in s]):
        assert time.monotonic() < deadline and child.running, log_path.read_text()
        time.sleep(0.1)
    return lines[0]


def test_refused_registration_says_why_and_what_next(tmp_path, model_repository):
    plane, server, admin, port, log_path = plane_and_registering_server(
        tmp_path, model_repository
    )  # no admin token: writes are refused
    try:
        plane.start()
        wait_http(f"http://127.0.0.1:{admin}/healthz", child=plane)
        server.start()
        said = wait_for_line(log_path, "refused", server)
    finally:
        server.stop()
        plane.stop()
    assert said.endswith(
        f"the control plane refused the registration (HTTP 403: writes are disabled: start the "
        f"control plane with an admin token (--admin-token-file or INFERGATE_ADMIN_TOKEN)) at "
        f"http://127.0.0.1:{admin}: this server keeps serving iris/v1 on 127.0.0.1:{port}, but "
        "the gateway sends it no request until it is registered"
    )


def test_registration_waits_for_a_control_plane_that_starts_later(tmp_path, model_repository):
    plane, server, admin, port, log_path = plane_and_registering_server(
        tmp_path, model_repository, "--admin-token-file", str(tmp_path / "token")
    )
    try:
        server.start()  # nothing listens on the admin address yet
        said = wait_for_line(log_path, "could not register", server)
        assert f"could not register with http://127.0.0.1:{admin} yet" in said
        assert "retrying until it answers" in said
        plane.start()
        wait_for_line(log_path, f"registered 127.0.0.1:{port} for iris/v1", server)
        endpoints = get_json(f"http://127.0.0.1:{admin}/endpoints")["endpoints"]
        assert {"model": "iris", "version": "v1", "address": f"127.0.0.1:{port}"} in endpoints
    finally:
        server.stop()
        plane.stop()


# --- the terminal of `infergate run`, end to end ---------------------------------------------
def test_run_terminal_shows_errors_unserved_versions_and_restarts(
    tmp_path, model_repository, envoy_binary
):
    listen, v1, v4 = free_port(), free_port(), free_port()
    admin = free_port()
    config = tmp_path / "routing.yaml"
    good = one_model(listen, v1)
    config.write_text(good)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    out = tmp_path / "terminal.txt"
    with out.open("w") as terminal:
        proc = subprocess.Popen(
            [*CLI, "run", str(config), "--repository", str(model_repository),
             "--workdir", str(tmp_path / "run"), "--xds", f"127.0.0.1:{free_port()}",
             "--admin", f"127.0.0.1:{admin}", "--envoy-admin", f"127.0.0.1:{free_port()}",
             "--admin-token-file", str(token)],
            stdout=terminal, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_for(text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while text not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        return next(line for line in out.read_text().splitlines() if text in line)

    try:
        wait_for("Ctrl-C stops everything", timeout=120)
        # The token reached the control plane: a registration is accepted.
        req = post(
            f"http://127.0.0.1:{admin}/endpoints",
            {"model": "iris", "version": "v1", "address": f"127.0.0.1:{free_port()}"},
            "s3cret",
        )
        assert req["changed"] is True
        bad = good + "    traffic: {v1: -5}\n"
        with pytest.raises(ConfigError) as problem:
            parse(bad, str(config))
        config.write_text(bad)
        assert wait_for(f"{problem.value}") == f"control plane: {problem.value}"
        config.write_text(
            good + f"      v4: {{endpoints: [127.0.0.1:{v4}]}}\n    traffic: {{v1: 50, v4: 50}}\n"
        )
        line = wait_for(f"iris/v4 at 127.0.0.1:{v4} is in {config} but was not started")
        assert line.startswith("infergate: ")
        wait_for("control plane: iris/v4 (weight 50) has no healthy HTTP endpoint (0 of 1)")
        status = get_json(f"http://127.0.0.1:{admin}/status")
        v4_status = next(v for v in status["versions"] if v["version"] == "v4")
        assert v4_status["http"]["healthy"] == 0
        # A model server dies: the restart line says so, with the end of its log.
        os.kill(model_server_pid(proc.pid, v1), signal.SIGKILL)
        line = wait_for(f"model iris/v1 @127.0.0.1:{v1} exited with code -9 after")
        assert "restarting in 1 s. Its log ends: " in line
        wait_http(f"http://127.0.0.1:{v1}/v2/health/ready", timeout=60)  # restarted
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        print(out.read_text())  # shown when the test fails, or with -s
    assert proc.returncode == 0, out.read_text()
    assert "Traceback" not in out.read_text()


def post(url: str, body: dict, token: str) -> dict:
    req = urllib.request.Request(
        url,
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


def model_server_pid(supervisor_pid: int, port: int) -> int:
    for proc in psutil.Process(supervisor_pid).children(recursive=True):
        if f"--port {port}" in " ".join(proc.cmdline()):
            return proc.pid
    raise LookupError(port)


async def test_a_probe_round_keeps_its_cpu_time_under_its_share():
    """Each batch's CPU time is followed by a pause 9x as long (share 0.1), so probing a
    large config never holds the event loop for long."""
    cpu = [0.0]
    pauses: list[float] = []
    probed: list[list[int]] = []

    async def probe(target: Target) -> str | None:
        cpu[0] += 0.001  # every probe costs 1 ms of CPU
        probed[-1].append(target.address.port)
        return None

    async def sleep(seconds: float) -> None:
        pauses.append(round(seconds, 6))
        probed.append([])

    monitor = HealthMonitor(probe, batch=3, cpu_share=0.1, cpu_clock=lambda: cpu[0], sleep=sleep)
    monitor.set_config(parse(TWO, "routing.yaml"))  # 7 endpoints
    probed.append([])
    await monitor.check()
    assert [len(b) for b in probed] == [3, 3, 1, 0]
    assert pauses == [0.027, 0.027, 0.009]
    assert all(v["http"]["unknown"] == 0 for v in monitor.versions())


async def test_probes_wait_while_the_control_plane_builds_but_never_starve():
    waits = iter([0.12, 0.07, 0.02])  # a build, then the push: 0.12 s left, ...
    pauses: list[float] = []

    async def probe(target: Target) -> str | None:
        pauses.append(-1)  # a probe ran
        return None

    async def sleep(seconds: float) -> None:
        pauses.append(round(seconds, 6))

    monitor = HealthMonitor(
        probe, batch=100, cpu_clock=lambda: 0.0, sleep=sleep, hold=lambda: next(waits, 0.0)
    )
    monitor.set_config(parse(TWO, "routing.yaml"))  # 7 endpoints: one batch
    await monitor.check()
    assert pauses == [0.05, 0.05, 0.02] + [-1] * 7 + [0.0]
    pauses.clear()
    monitor.hold = lambda: 1.0  # builds without end: a batch still goes after MAX_HOLD
    await monitor.check()
    assert pauses == [0.05] * 40 + [-1] * 7 + [0.0]
